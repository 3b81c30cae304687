"""Lineage of a candidate, derived from dvc.lock: the single record of what produced what.

Starting at the stage that wrote the candidate, the record follows every dependency
to the stage that wrote it, up to the prepared and raw data, with the hashes and
params dvc.lock holds for each. Added: the pretrained model a text teacher started from
(package, version and each file's sha256, from models/pretrained/manifest.json), the
compression steps inside the candidate's stage (each step file's sha256, from its
lineage.json), the sha256 of every code file the chain's stages declare (and the
distribution and version of an architecture installed as a package), the git revision,
metrics and gate verdict. `problems` lists what breaks the chain; a candidate with
problems cannot be promoted.

The git revision is the commit that holds this workspace's dvc.lock, params and reports: a
run commit the pipeline flow records on a ref of its own (`record_run`, made with a scratch
index, so the user's branch, index and working tree stay as they are), or HEAD when the
user committed them. Revisions and stage names read back from a record are validated before
they reach git or DVC: a registry record is untrusted.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

from tasks.codedeps import MissingDep, arch_references, code_deps, external_architectures, undeclared
from tasks.io import file_sha256, read_json

TEACHER = "models/teacher.safetensors"
PRETRAINED = "models/pretrained"  # written by the stage `pretrained` (tasks/pretrained.py)
PREPARED = "data/prepared"
RAW = "data/raw"
RESULT_STAGES = ("evaluate", "gate")  # their outputs (metrics, verdicts) must describe the current models
RUN_REFS = "refs/heads/shrinkflow/runs/"  # one per recorded run: <UTC time>-<commit>
COMMIT_ID = re.compile(r"[0-9a-f]{40}")
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_@.-]{0,127}")  # dvc.yaml names, `name@key` for foreach stages
RUN_AUTHOR = {"GIT_AUTHOR_NAME": "shrinkflow pipeline", "GIT_AUTHOR_EMAIL": "shrinkflow@localhost",
              "GIT_COMMITTER_NAME": "shrinkflow pipeline", "GIT_COMMITTER_EMAIL": "shrinkflow@localhost"}


class NotRecordable(ValueError):
    """The workspace cannot hold a git record of a run: not a git repository, or no commit yet."""


def is_commit_id(value: object) -> bool:
    return isinstance(value, str) and COMMIT_ID.fullmatch(value) is not None


def is_stage_name(value: object) -> bool:
    return isinstance(value, str) and STAGE_NAME.fullmatch(value) is not None


def read_lock(root: Path) -> dict[str, dict]:
    lock = root / "dvc.lock"
    if not lock.is_file():
        raise FileNotFoundError(f"{lock}: missing; run `dvc repro` (or the Prefect flow) first")
    return yaml.safe_load(lock.read_text())["stages"]


def within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def producer(lock: dict[str, dict], path: str) -> str | None:
    """The stage whose outputs include `path` (or a directory holding it)."""
    for name, entry in lock.items():
        if any(within(path, out["path"]) for out in entry.get("outs", [])):
            return name
    return None


def ancestry(lock: dict[str, dict], stage: str) -> list[str]:
    """`stage` and every stage it depends on, directly or not; each stage before the stages it came from."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in lock[name].get("deps", []):
                if (parent := producer(lock, dep["path"])) and parent != name:
                    visit(parent)
            order.append(name)

    visit(stage)
    return order[::-1]


def stage_record(entry: dict) -> dict:
    return {"cmd": entry["cmd"],
            "deps": {d["path"]: d["md5"] for d in entry.get("deps", [])},
            "outs": {o["path"]: o["md5"] for o in entry.get("outs", [])},
            "params": entry.get("params", {}).get("params.yaml", {})}


def broken_links(lock: dict[str, dict], chain: list[str]) -> list[str]:
    """Dependencies whose hash in dvc.lock differs from the hash their producer recorded."""
    problems = []
    for name in chain:
        for dep in lock[name].get("deps", []):
            source = producer(lock, dep["path"])
            outs = {o["path"]: o["md5"] for o in lock[source]["outs"]} if source else {}
            if dep["path"] in outs and outs[dep["path"]] != dep["md5"]:
                problems.append(f"dvc.lock: {name} used {dep['path']} {dep['md5']}, but {source} recorded "
                                f"{outs[dep['path']]}; rerun `dvc repro`")
    return problems


def stage_status(root: Path, names: list[str]) -> dict[str, list]:
    """`dvc status` of the named stages: those whose files, code or params differ from dvc.lock."""
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *names], cwd=root,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dvc status in {root} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout or "{}")


def dvc_files(root: Path) -> tuple[set[str], set[str]]:
    """The outputs dvc.yaml keeps out of the cache (`cache: false`: never pushed, so never pulled), and the
    `.dvc` files of data added to DVC."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with contextlib.chdir(root), Repo(".") as repo:  # DVC resolves some paths against the cwd
        stages = list(repo.index.stages)
        return ({str(out.def_path) for stage in stages for out in stage.outs if not out.use_cache},
                {stage.relpath for stage in stages if not isinstance(stage, PipelineStage)})


def describe_change(change: list) -> str:
    parts = []
    for item in change:
        if isinstance(item, dict):
            for kind, paths in item.items():
                parts.append(f"{kind}: " + ", ".join(f"{p} {s}" for p, s in paths.items())
                             if isinstance(paths, dict) else kind)
        else:
            parts.append(str(item))
    return "; ".join(parts)


def git(root: Path, *args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env, input=stdin)


def checked_git(root: Path, *args: str, env: dict | None = None) -> str:
    done = git(root, *args, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {root} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def head_commit(root: Path) -> str:
    if git(root, "rev-parse", "--is-inside-work-tree").returncode != 0:
        raise NotRecordable(f"{root} is not a git repository: `git init` and commit the code, so that runs can be "
                            f"recorded and promoted")
    head = git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if head.returncode != 0:
        raise NotRecordable(f"{root}: the git repository has no commit yet: commit the code (`git add -A && "
                            f"git commit`), so that runs can be recorded on top of it and promoted")
    return head.stdout.strip()


@contextlib.contextmanager
def scratch_index(root: Path, revision: str):
    """Environment for git commands that stage into an index of `revision` in a temporary file, not the user's."""
    with tempfile.TemporaryDirectory(prefix="shrinkflow-index-") as scratch:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(scratch) / "index"))
        checked_git(root, "read-tree", revision, env=env)
        yield env


def run_files(root: Path) -> list[str]:
    """What git must hold to describe a run: dvc.lock, params.yaml, the `.dvc` files of data added to DVC and
    the outputs DVC does not cache (reports, metrics, plots), where they exist and are not git-ignored."""
    uncached, added = dvc_files(root)
    present = sorted(f for f in {"dvc.lock", "params.yaml"} | uncached | added if (root / f).exists())
    ignored = git(root, "check-ignore", "-z", "--stdin", stdin="\0".join(present)).stdout.split("\0")
    return [f for f in present if f not in ignored]


def run_tree(root: Path, head: str) -> str:
    """The tree of `head` with the workspace's run files in it, written without touching the user's index."""
    with scratch_index(root, head) as env:
        checked_git(root, "add", "--all", "--", *run_files(root), env=env)
        return checked_git(root, "write-tree", env=env)


def matching_record(root: Path, head: str, tree: str) -> tuple[str, str] | None:
    """(commit, ref) of HEAD or of a run recorded on top of it whose tree is `tree`, the newest first."""
    if checked_git(root, "rev-parse", f"{head}^{{tree}}") == tree:
        return head, "HEAD"
    runs = checked_git(root, "for-each-ref", "--sort=-committerdate", "--format=%(objectname) %(tree) %(parent) "
                       "%(refname)", RUN_REFS)
    for commit, run_tree_id, parent, ref in (line.split(" ", 3) for line in runs.splitlines()):
        if (run_tree_id, parent) == (tree, head):
            return commit, ref
    return None


def recorded_revision(root: Path) -> str | None:
    """The commit that holds the workspace's run files as they are now (HEAD or a run ref), if any."""
    try:
        head = head_commit(root)
    except NotRecordable:
        return None
    found = matching_record(root, head, run_tree(root, head))
    return found[0] if found else None


def record_run(root: Path, message: str) -> dict:
    """Commit the workspace's run files on top of HEAD to a new run ref, unless HEAD or a run ref holds them.

    Plumbing with a scratch index: the user's branch, index and working tree are left as they are.
    Returns the commit, its ref and whether it is new.
    """
    root = Path(root).resolve()
    head = head_commit(root)
    tree = run_tree(root, head)
    found = matching_record(root, head, tree)
    if found:
        return {"revision": found[0], "ref": found[1], "new": False}
    commit = checked_git(root, "commit-tree", tree, "-p", head, "-m", message, env=dict(os.environ, **RUN_AUTHOR))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    ref = f"{RUN_REFS}{stamp}-{commit[:12]}"
    checked_git(root, "update-ref", ref, commit, "")  # "": the ref must not exist yet
    return {"revision": commit, "ref": ref, "new": True}


def worktree_changes(root: Path, env: dict, paths: list[str], untracked: bool) -> list[str]:
    """Paths whose working-tree content differs from the index in `env` (and, with `untracked`, new files)."""
    listed = git(root, "status", "--porcelain", "-z", "--no-renames",
                 f"--untracked-files={'all' if untracked else 'no'}", "--", *paths, env=env)
    if listed.returncode != 0:
        raise RuntimeError(f"git status in {root} failed: {listed.stderr.strip()[-2000:]}")
    # Entries are "XY path": X compares the index with HEAD (not asked here), Y the working tree with the index.
    return [entry[3:] for entry in listed.stdout.split("\0") if entry and (entry[1] != " " or entry[:2] == "??")]


def code_state(root: Path, paths: list[str], revision: str | None = None) -> tuple[dict, list[str]]:
    """The git revision (HEAD if none is given) and whether the tree differs from it; problems if a file the
    lineage rests on differs from that revision."""
    try:
        head = head_commit(root)
    except NotRecordable as e:
        return {"git_revision": None, "dirty": True}, [str(e)]
    commit = git(root, "rev-parse", "--verify", "--quiet", f"{revision or head}^{{commit}}").stdout.strip()
    if not commit:
        return {"git_revision": revision, "dirty": True}, [f"git revision {revision}: not a commit of {root}"]
    with scratch_index(root, commit) as env:
        dirty = bool(worktree_changes(root, env, [], untracked=False))
        uncommitted = worktree_changes(root, env, paths, untracked=True)
    return ({"git_revision": commit, "dirty": dirty},
            [f"{path}: not committed at {commit[:12]}" for path in uncommitted])


def deployable_files(root: Path, metrics: dict) -> list[Path]:
    """The model file the candidate is measured by, plus its ONNX export if it is deployed on ONNX Runtime."""
    model = root / metrics["file"]
    files = [model]
    steps = model.parent / "lineage.json"
    if metrics["runtime"] == "onnxruntime" and model.suffix != ".onnx" and steps.is_file():
        files.append(model.parent / read_json(steps)["runtime_onnx"])
    return files


def compression_steps(root: Path, model: Path) -> tuple[list[dict], list[str]]:
    """The steps recorded in the candidate's lineage.json, each file checked against its recorded sha256."""
    path = model.parent / "lineage.json"
    if not path.is_file():
        return [], []
    steps, problems = read_json(path)["chain"], []
    for step in steps:
        file = root / step["file"] if step["method"] == "source" else model.parent / step["file"]
        if not file.is_file() or file_sha256(file) != step["sha256"]:
            problems.append(f"{path}: step {step['method']} {step['file']} does not match its sha256")
    return steps, problems


def pretrained_model(root: Path, node: dict | None) -> tuple[dict | None, list[str]]:
    """The pretrained model of the chain (`node`: its stage's output) from its manifest.json, each file
    checked against the sha256 recorded there; None if the chain has none or it configured no model."""
    if node is None:
        return None, []
    manifest_path = root / PRETRAINED / "manifest.json"
    if not manifest_path.is_file():
        return None, [f"{manifest_path}: missing; run `dvc repro` or the flow"]
    manifest = read_json(manifest_path)
    if manifest["source"] is None:
        return None, []
    files = {name: f["sha256"] for name, f in manifest["files"].items()}
    problems = [f"{PRETRAINED}/{name}: does not match the sha256 in {PRETRAINED}/manifest.json"
                for name, digest in files.items()
                if not (root / PRETRAINED / name).is_file() or file_sha256(root / PRETRAINED / name) != digest]
    return {**node, "source": manifest["source"], "distribution": manifest["distribution"],
            "version": manifest["version"], "source_path": manifest["path"], "files": files,
            "record_verified": manifest["record_verified"]}, problems


def candidate_lineage(root: Path, candidate: str, revision: str | None = None) -> dict:
    """The lineage record of one evaluated candidate in the workspace at `root`."""
    return lineages(root, [candidate], revision)[candidate]


def lineages(root: Path, candidates: list[str], revision: str | None = None) -> dict[str, dict]:
    """Lineage records of evaluated candidates against git `revision` (default: the commit that holds the
    workspace's run files, else HEAD); dvc.lock, the reports and `dvc status` are read once for all."""
    root = Path(root).resolve()
    revision = revision or recorded_revision(root)
    evaluation = read_json(root / "reports" / "evaluation.json")
    verdicts = read_json(root / "reports" / "gate.json")["verdicts"]
    unknown = [c for c in candidates if c not in evaluation["models"]]
    if unknown:
        raise ValueError(f"unknown candidate {unknown[0]!r}; evaluated: {', '.join(evaluation['models'])}")
    lock = read_lock(root)
    stages_of = {c: (s := producer(lock, evaluation["models"][c]["file"])) and ancestry(lock, s) or []
                 for c in candidates}
    checked = sorted({name for chain in stages_of.values() for name in chain} | (set(RESULT_STAGES) & set(lock)))
    status = stage_status(root, checked) if any(stages_of.values()) else {}
    missing = undeclared(code_deps(root)) if any(stages_of.values()) else []
    return {c: build_record(root, c, evaluation["models"][c], verdicts.get(c), lock, stages_of[c], status, missing,
                            revision) for c in candidates}


def code_files(root: Path, lock: dict[str, dict], chain: list[str]) -> dict[str, str]:
    """sha256 of every .py file the chain's stages declare in dvc.lock: named, or inside a declared directory."""
    found: set[Path] = set()
    for name in chain:
        for dep in lock[name].get("deps", []):
            path = root / dep["path"]
            if producer(lock, dep["path"]):
                continue  # an output of another stage, not code
            if path.is_dir():
                found.update(path.rglob("*.py"))
            elif path.suffix == ".py" and path.is_file():  # a deleted one: dvc status reports it
                found.add(path)
    return {file.relative_to(root).as_posix(): file_sha256(file) for file in sorted(found)}


def installed_architectures(root: Path, stages: dict[str, dict]) -> tuple[dict, list[str]]:
    """Architectures the chain's params name from installed packages; problems if no distribution provides one."""
    archs = [(f"dvc.lock: stage {name}, params {where}", arch) for name, stage in stages.items()
             for where, arch in arch_references(stage["params"])]
    packages = external_architectures(root, archs)
    problems = [f"{where}: architecture {arch} is neither a file of the repository nor from an installed "
                f"distribution; its code cannot be identified" for where, arch in archs
                if arch in packages and not packages[arch]["distributions"]]
    return packages, problems


def build_record(root: Path, candidate: str, metrics: dict, verdict: dict | None, lock: dict[str, dict],
                 chain: list[str], status: dict[str, list], missing: list[MissingDep], revision: str | None) -> dict:
    stage = chain[0] if chain else None
    problems = [] if stage else [f"dvc.lock: no stage records {metrics['file']}"]
    stages = {name: stage_record(lock[name]) for name in chain}
    files = deployable_files(root, metrics)
    steps, step_problems = compression_steps(root, files[0])

    def node(path: str) -> dict | None:
        name = producer(lock, path)
        if name not in stages:
            return None
        return {"path": path, "stage": name, "md5": stages[name]["outs"].get(path)
                or next(md5 for out, md5 in stages[name]["outs"].items() if within(path, out))}

    teacher, prepared = node(TEACHER), node(PREPARED)
    if teacher is None:
        problems.append(f"{candidate} does not derive from the teacher ({TEACHER}) in dvc.lock")
    else:
        teacher["sha256"] = file_sha256(root / TEACHER)
    if prepared is None:
        problems.append(f"{candidate} does not derive from {PREPARED} in dvc.lock")
    raw = {"path": RAW, "md5": stages[prepared["stage"]]["deps"].get(RAW)} if prepared else None
    pretrained, pretrained_problems = pretrained_model(root, node(PRETRAINED))
    if chain:
        problems += broken_links(lock, chain) + [
            f"{name} changed since dvc.lock ({describe_change(status[name])}); run `dvc repro` or the flow"
            for name in chain + list(RESULT_STAGES) if name in status]
    tracked = ["dvc.lock", "dvc.yaml", "params.yaml"] + sorted(
        {p for s in stages.values() for p in s["deps"] if not producer(lock, p)})
    code, code_problems = code_state(root, tracked, revision)
    code["files"] = code_files(root, lock, chain)
    code["packages"], package_problems = installed_architectures(root, stages)
    # Code a stage runs but dvc.yaml does not declare: dvc status cannot see it change.
    code_problems += [str(m) for m in missing if m.stage in chain or m.stage in RESULT_STAGES] + package_problems
    return {
        "candidate": candidate,
        "stage": stage,
        "files": [{"path": str(f.relative_to(root)), "sha256": file_sha256(f), "bytes": f.stat().st_size}
                  for f in files if f.is_file()],
        "steps": steps,
        "teacher": teacher,
        "pretrained": pretrained,
        "data": {"source": stages[prepared["stage"]]["params"].get("data", {}).get("source") if prepared else None,
                 "raw": raw, "prepared": prepared},
        "stages": stages,
        "code": code,
        "metrics": {k: v for k, v in metrics.items() if k != "file"},
        "gate": {"passed": verdict["passed"], "failures": verdict["failures"]} if verdict else None,
        "problems": problems + pretrained_problems + step_problems + code_problems,
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def short(digest: str | None) -> str:
    return (digest or "—")[:12]


def flatten(values: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested params as (dotted.key, value) pairs; lists stay whole."""
    pairs = []
    for key, value in values.items():
        if isinstance(value, dict):
            pairs += flatten(value, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", json.dumps(value, separators=(",", ":"))))
    return pairs


def format_lineage(record: dict, heading: str | None = None) -> str:
    """The record as a readable chain, newest first, down to the raw data."""
    m, gate = record["metrics"], record["gate"]
    lines = [heading or f"candidate {record['candidate']}"]
    for f in record["files"]:
        lines.append(f"  file      {f['path']}  sha256 {short(f['sha256'])}  {f['bytes']:,} bytes")
    verdict = "—" if gate is None else "PASS" if gate["passed"] else "FAIL: " + "; ".join(gate["failures"])
    lines.append(f"  metrics   accuracy {100 * m['accuracy']:.2f} %  {m['size_reduction']:.1f}x smaller  "
                 f"{m['speedup']:.2f}x faster ({m['runtime']})  gate {verdict}")
    code = record["code"]
    lines.append(f"  code      git {short(code['git_revision'])}" + ("  (dirty tree)" if code["dirty"] else "  (clean)"))
    files = code.get("files", {})  # absent in records written before code files were recorded
    row = f"{len(files)} files, sha256:"
    for item in (f"{path} {short(digest)}" for path, digest in files.items()):
        if len(row) + len(item) > 90:
            lines.append(f"            {row}")
            row = ""
        row = f"{row}  {item}" if row else item
    lines.append(f"            {row}")
    for arch, package in code.get("packages", {}).items():
        found = ", ".join(f"{name} {version}" for name, version in package["distributions"].items())
        lines.append(f"            architecture {arch} from {found or 'no distribution'}")
    if record["steps"]:
        lines.append(f"  steps in {record['stage']}:")
        for step in reversed(record["steps"]):
            settings = ", ".join(f"{k}={v}" for k, v in step["settings"].items())
            lines.append(f"    {step['method']:<17} {step['file']:<34} sha256 {short(step['sha256'])}  {settings}")
    lines.append("  stages (dvc.lock):")
    for name, stage in record["stages"].items():
        outs = ", ".join(f"{path} md5 {short(md5)}" for path, md5 in stage["outs"].items())
        lines.append(f"    {name:<24} {outs}")
        settings = [f"{key}={value}" for key, value in flatten(stage["params"])]
        for line in textwrap.wrap("  ".join(settings), 100, break_long_words=False):
            lines.append(f"    {'':<24}   {line}")
    if record["teacher"]:
        t = record["teacher"]
        lines.append(f"  teacher   {t['path']}  md5 {short(t['md5'])}  sha256 {short(t['sha256'])}  ({t['stage']})")
    if p := record.get("pretrained"):  # absent in records written before pretrained models
        origin = p["source_path"] or f"{p['distribution']} {p['version']}"
        verified = "verified against its wheel's RECORD" if p["record_verified"] else "hashes recorded only"
        lines.append(f"  pretrained {p['path']}  md5 {short(p['md5'])}  <-  {origin}  ({verified})")
        lines.append("            " + "  ".join(f"{name} sha256 {short(digest)}" for name, digest in p["files"].items()))
    data = record["data"]
    if data["prepared"]:
        lines.append(f"  data      {data['prepared']['path']} md5 {short(data['prepared']['md5'])}  <-  "
                     f"{data['raw']['path']} md5 {short(data['raw']['md5'])}  (source {data['source']})")
    lines.append("  lineage   " + ("complete" if not record["problems"] else "INCOMPLETE"))
    lines += [f"    - {p}" for p in record["problems"]]
    return "\n".join(lines)



def reproduce(record: dict, repo_url: str, remote_url: str, workdir: Path, storage) -> list[dict]:
    """Clone `repo_url` at the recorded revision into `workdir`, pull the lineage from the DVC remote
    and compare every recorded hash with what arrived. Returns one check per hash."""
    from tasks.storage import configure_dvc_remote

    revision, stage = record["code"]["git_revision"], record["stage"]
    # Registry records are untrusted: they name a commit and stages, never options or commands.
    if not is_commit_id(revision):
        raise RuntimeError(f"lineage record: git_revision {revision!r} is not a commit id")
    for name in [stage, *record["stages"]]:
        if not is_stage_name(name):
            raise RuntimeError(f"lineage record: stage {name!r} is not a dvc.yaml stage name")
    # A clone has every branch, run refs (refs/heads/shrinkflow/runs/) included; a remote that lacks the
    # run's ref may still serve the commit itself.
    done = subprocess.run(["git", "clone", "--quiet", "--no-checkout", "--", repo_url, str(workdir)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git clone {repo_url}: {done.stderr.strip()}")
    if git(workdir, "cat-file", "-e", f"{revision}^{{commit}}").returncode != 0:
        fetched = git(workdir, "fetch", "--quiet", "origin", revision)
        if fetched.returncode != 0:
            raise RuntimeError(f"{repo_url} has no commit {revision} (push its run ref, {RUN_REFS}...): "
                               f"{fetched.stderr.strip()}")
    checked_git(workdir, "checkout", "--quiet", revision, "--")
    configure_dvc_remote(workdir, storage, url=remote_url)
    pulled = subprocess.run([sys.executable, "-m", "dvc", "pull", "--with-deps", stage], cwd=workdir,
                            capture_output=True, text=True)
    if pulled.returncode != 0:
        raise RuntimeError(f"dvc pull from {remote_url} failed: {(pulled.stderr or pulled.stdout).strip()[-2000:]}")
    lock, uncached = read_lock(workdir), dvc_files(workdir)[0]
    changed, checks = set(), []
    for name, changes in stage_status(workdir, list(record["stages"])).items():
        for item in changes:
            for kind, paths in (item.items() if isinstance(item, dict) else [(item, None)]):
                if kind == "changed outs":
                    changed |= set(paths)
                else:
                    checks.append({"what": f"{name}: {kind}", "expected": "unchanged", "actual": str(paths)})
    for name, stage_entry in record["stages"].items():
        recorded = {o["path"]: o["md5"] for o in lock.get(name, {}).get("outs", [])}
        for path, md5 in stage_entry["outs"].items():
            if path not in uncached:  # reports kept in git or not at all; the remote has the rest
                actual = "pulled files differ" if path in changed else recorded.get(path)
                checks.append({"what": f"{name}: {path} (md5)", "expected": md5, "actual": actual})
    files = [(f["path"], f["sha256"]) for f in record["files"]]
    if record["teacher"]:
        files.append((record["teacher"]["path"], record["teacher"]["sha256"]))
    files += record["code"].get("files", {}).items()  # the code at the recorded revision
    clone = workdir.resolve()
    for path, digest in files:
        local = (clone / path).resolve()  # the record may come from the registry: untrusted paths
        actual = ("outside the clone" if not local.is_relative_to(clone)
                  else file_sha256(local) if local.is_file() else "missing")
        checks.append({"what": f"{path} (sha256)", "expected": digest, "actual": actual})
    for check in checks:
        check["match"] = check["expected"] == check["actual"]
    return checks
