"""Stage `train_teacher`: the large model, trained on labels alone."""

from __future__ import annotations

from pathlib import Path

from tasks.io import run_main
from tasks.params import ModelParams, load_section
from tasks.training import EpochCallback, Trained, run_training_stage, stage_arguments, train_model
from tasks.validate import require_validated


def train_teacher(prepared_dir: Path, params: ModelParams, checkpoint: Path | None = None,
                  on_epoch_end: EpochCallback | None = None) -> Trained:
    return train_model(prepared_dir, params, role="teacher", checkpoint=checkpoint, on_epoch_end=on_epoch_end)


def run(argv: list[str] | None = None) -> None:
    """The stage as dvc.yaml runs it: paths from the command line, params from params.yaml."""
    args = stage_arguments(argv, with_teacher=False, description=__doc__)
    require_validated(args.validation_result)
    params = load_section("teacher", ModelParams, args.params)
    run_training_stage("tasks.train_teacher", argv, args, params.train,
                       lambda: train_teacher(args.prepared_dir, params, args.checkpoint))


if __name__ == "__main__":
    run_main(run)
