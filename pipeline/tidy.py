"""Remove the checkpoints of abandoned training runs: `python -m pipeline.tidy` (`make tidy`; the Makefile's
pipeline targets run it after `dvc repro`).

A killed `train@<member>` leaves its checkpoint (up to 537 MB: VGG16 fine-tuned whole, with Adam's state) so that
the next `dvc repro` of the same params resumes it. When DVC instead restores that stage from its run cache
(the params went back to an earlier run's), no code of ours runs, and the checkpoint would stay for good. It is
abandoned exactly when the stage's model exists beside it: DVC removes a stage's outputs before running it, and
`train` removes its model itself when run by hand, so while a run can still be resumed its model is absent.
The checkpoint's folder, name and model come from each `train@` stage's command in dvc.yaml, not from here.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from pipeline.config import setup_logging

log = logging.getLogger("tidy")


def train_runs(repo_root: Path) -> list[tuple[Path, Path]]:
    """(model, checkpoint) of each `train` stage in dvc.yaml, as its command names them."""
    from dvc.repo import Repo  # here: importing DVC takes a second

    from pipeline.train import parse_args

    runs = []
    with Repo(str(repo_root)) as repo:
        for stage in repo.index.stages:
            cmd = shlex.split(stage.cmd) if isinstance(stage.cmd, str) else []
            if cmd[1:3] != ["-m", "pipeline.train"]:
                continue
            args = parse_args(cmd[3:])
            runs.append((repo_root / args.model, repo_root / args.checkpoint))
    return runs


def abandoned(runs: list[tuple[Path, Path]]) -> list[Path]:
    """The checkpoints whose run can no longer resume: their model exists."""
    return [checkpoint for model, checkpoint in runs if checkpoint.exists() and model.exists()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Remove the checkpoints of abandoned training runs.")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project (holding dvc.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    for checkpoint in abandoned(train_runs(args.repo)):
        size = checkpoint.stat().st_size
        checkpoint.unlink()
        log.info("removed %s (%.1f MB): its run was abandoned, the stage's model is in place", checkpoint, size / 1e6)


if __name__ == "__main__":
    main()
