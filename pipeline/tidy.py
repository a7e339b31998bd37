"""Remove the checkpoints of abandoned training runs: `python -m pipeline.tidy` (`make tidy`; the Makefile's
pipeline targets run it after `dvc repro`).

A killed `train@<member>` leaves its checkpoint (up to about 1.6 GB: VGG16 fine-tuned whole, with AdamW's two
moments) so that the next `dvc repro` of the same params resumes it. When DVC instead restores that stage from
its run cache (the params went back to an earlier run's), no code of ours runs, and the checkpoint would stay for
good. It is abandoned when the stage's model is back beside it (DVC removes a stage's outputs before running it,
and `train` removes its model itself when run by hand, so a run in progress has no model) and it is not of the
current params and data, which the next `dvc repro` would resume. The paths come from each `train@` stage's
command in dvc.yaml, not from here. A removed member's checkpoint is not seen: delete it by hand.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from pipeline.config import setup_logging

log = logging.getLogger("tidy")


def train_runs(repo_root: Path) -> list[argparse.Namespace]:
    """The arguments of each `train` stage's command in dvc.yaml, its paths from the stage's folder."""
    from dvc.repo import Repo  # here: importing DVC takes a second

    from pipeline.train import parse_args

    runs = []
    with Repo(str(repo_root)) as repo:
        for stage in repo.index.stages:
            for cmd in [stage.cmd] if isinstance(stage.cmd, str) else stage.cmd or []:
                words = shlex.split(cmd)
                if words[1:3] != ["-m", "pipeline.train"]:
                    continue
                args = parse_args(words[3:])
                for name in ("data", "model", "checkpoint", "params"):
                    setattr(args, name, Path(stage.wdir) / getattr(args, name))
                runs.append(args)
    return runs


def resumable(run: argparse.Namespace) -> bool:
    """Whether the next `dvc repro` would resume this checkpoint: it is of the params and data as they are now
    (say `dvc checkout` put the last finished run's model back while params.yaml still holds the killed run's)."""
    import torch

    from pipeline.params.train import load_member
    from pipeline.train import run_key

    if not (run.data / "manifest.csv").exists():
        return True  # no prepared data to compare with: keep it
    ckpt = torch.load(run.checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return ckpt.get("run_key") == run_key(load_member(run.member, run.params), run.data)


def abandoned(runs: list[argparse.Namespace]) -> list[Path]:
    """The checkpoints whose run was abandoned: its model is in place and it is not the current params' run."""
    return [r.checkpoint for r in runs if r.checkpoint.exists() and r.model.exists() and not resumable(r)]


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
