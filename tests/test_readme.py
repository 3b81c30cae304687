"""The README's params.yaml examples are valid for both readers: PyYAML (the stages) and DVC's ruamel.yaml
(`dvc repro` reads params.yaml too, and refuses flow mappings PyYAML accepts, such as `{arch: mod:fn}`)."""

from __future__ import annotations

import re

import pytest
import yaml
from dvc.utils.serialize import parse_yaml

from tasks.workspace import ROOT

YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def test_the_readme_has_yaml_examples():
    assert len(YAML_BLOCKS) >= 5


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[block.splitlines()[0] for block in YAML_BLOCKS])
def test_every_yaml_example_reads_the_same_in_pyyaml_and_dvc(block):
    assert parse_yaml(block, "README.md") == yaml.safe_load(block)


def test_dvc_refuses_what_pyyaml_accepts():  # why the test above exists
    example = "model: {arch: architectures.mymodule:build, width: 16}"
    assert yaml.safe_load(example)["model"]["arch"] == "architectures.mymodule:build"
    with pytest.raises(Exception, match="YAML file structure is corrupted"):
        parse_yaml(example, "README.md")
