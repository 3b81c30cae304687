"""Stage `distill`: the student architecture trained from the teacher (Hinton et al. 2015).

Same architecture, initialisation and recipe as `train_student`; only the loss
differs: soft targets from the teacher at temperature T, mixed with the labels.
"""

from __future__ import annotations

from pathlib import Path

from tasks.io import run_main
from tasks.params import DistillParams, ModelParams, load_section
from tasks.training import EpochCallback, Trained, run_training_stage, stage_arguments, train_model
from tasks.validate import require_validated


def distill(prepared_dir: Path, teacher_path: Path, student: ModelParams, params: DistillParams,
            checkpoint: Path | None = None, on_epoch_end: EpochCallback | None = None) -> Trained:
    return train_model(prepared_dir, student, role="distilled", checkpoint=checkpoint,
                       teacher_path=teacher_path, distill=params, on_epoch_end=on_epoch_end)


def run(argv: list[str] | None = None) -> None:
    """The stage as dvc.yaml runs it: paths from the command line, params from params.yaml."""
    args = stage_arguments(argv, with_teacher=True, description=__doc__)
    require_validated(args.validation_result)
    student = load_section("student", ModelParams, args.params)
    params = load_section("distill", DistillParams, args.params)
    run_training_stage("tasks.distill", argv, args, student.train,
                       lambda: distill(args.prepared_dir, args.teacher, student, params, args.checkpoint))


if __name__ == "__main__":
    run_main(run)
