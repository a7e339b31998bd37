"""Remove what killed runs left and no later run will: `python -m pipeline.tools.tidy` (`make tidy`; the Makefile's
pipeline targets run it after `dvc repro`).

A killed `train@<member>` leaves its checkpoint (up to about 1.6 GB: VGG16 fine-tuned whole, with AdamW's two
moments) so that the next `dvc repro` of the same params resumes it. When DVC instead restores that stage from
its run cache (the params went back to an earlier run's), no code of ours runs, and the checkpoint would stay for
good. It is abandoned when the stage's model is back beside it (DVC removes a stage's outputs before running it,
and `train` removes its model itself when run by hand, so a run in progress has no model) and it is not of the
current params and data, which the next `dvc repro` would resume. The paths come from each `train@` stage's
command in dvc.yaml, not from here. A removed member's checkpoint is not seen: delete it by hand.

A write killed by SIGKILL leaves its temporary beside its target (pipeline/files.py: `models/.model.pt.tmp`,
174 MB for VGG16; `data/.prepared.tmp`): tidy removes each one beside or inside a stage's outputs (dvc.yaml) and
beside a checkpoint. A killed `package` leaves BentoML's staging copy of the model (600 MB for VGG16) in
`$BENTOML_HOME/tmp/package`; `package` removes it when it runs again, but a run restored from the run cache runs
no code: tidy removes the staging of params.yaml's `package.model_name`. It holds DVC's lock meanwhile, so it
never removes what a running `dvc repro` is writing; a stage run by hand at the same time is not seen.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path

from pipeline.config import load_params, setup_logging
from pipeline.files import is_temporary, remove_leftover, temporary_sibling
from pipeline.params.package import PackageParams

log = logging.getLogger("tidy")


def train_runs(repo) -> list[argparse.Namespace]:
    """The arguments of each `train` stage's command in the dvc.yaml of `repo` (a dvc Repo), its paths from the
    stage's folder."""
    from pipeline.checkpoint import train_arguments

    runs = []
    for stage in repo.index.stages:
        for cmd in [stage.cmd] if isinstance(stage.cmd, str) else stage.cmd or []:
            words = shlex.split(cmd)
            if words[1:3] != ["-m", "pipeline.stages.train"]:
                continue
            args = train_arguments(words[3:])
            for name in ("data", "model", "checkpoint", "params"):
                setattr(args, name, Path(stage.wdir) / getattr(args, name))
            runs.append(args)
    return runs


def stage_outputs(repo) -> list[Path]:
    """Every output of every stage of dvc.yaml (metrics and plots too), not what a .dvc file tracks."""
    return [Path(out.fs_path) for stage in repo.index.stages if getattr(stage, "cmd", None) for out in stage.outs]


def leftover_temporaries(outputs: list[Path]) -> list[Path]:
    """The temporaries of killed writes: beside each of `outputs`, and inside those that are folders."""
    found = {temporary_sibling(p) for p in outputs if temporary_sibling(p).exists()}
    for out in outputs:
        if out.is_dir() and not out.is_symlink():
            for root, dirs, files in os.walk(out):
                found.update(Path(root) / name for name in dirs + files if is_temporary(Path(name)))
                dirs[:] = [d for d in dirs if not is_temporary(Path(d))]  # a temporary folder goes whole
    return sorted(found)


def package_staging(model_name: str) -> list[Path]:
    """BentoML's staging folders of `model_name` that a killed `package` left (pipeline/stages/package.py:
    own_staging)."""
    staging = Path(os.environ.get("BENTOML_HOME", "~/bentoml")).expanduser() / "tmp" / "package"
    return sorted(staging.glob(f"bentoml-model-{model_name}-*"))


def resumable(run: argparse.Namespace) -> bool:
    """Whether the next `dvc repro` would resume this checkpoint: it is of the params and data as they are now
    (say `dvc checkout` put the last finished run's model back while params.yaml still holds the killed run's)."""
    import torch

    from pipeline.checkpoint import run_key
    from pipeline.params.train import load_member

    if not (run.data / "manifest.csv").exists():
        return True  # no prepared data to compare with: keep it
    ckpt = torch.load(run.checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return ckpt.get("run_key") == run_key(load_member(run.member, run.params), run.data)


def abandoned(runs: list[argparse.Namespace]) -> list[Path]:
    """The checkpoints whose run was abandoned: its model is in place and it is not the current params' run."""
    return [r.checkpoint for r in runs if r.checkpoint.exists() and r.model.exists() and not resumable(r)]


def tidy(repo, root: Path) -> None:
    """Remove what killed runs left in the project of `repo` (whose folder is `root`) and in the model store."""
    runs = train_runs(repo)
    for checkpoint in abandoned(runs):
        size = checkpoint.stat().st_size
        checkpoint.unlink()
        log.info("removed %s (%.1f MB): its run was abandoned, the stage's model is in place", checkpoint, size / 1e6)
    outputs = stage_outputs(repo) + [r.checkpoint.absolute() for r in runs]
    for tmp in leftover_temporaries(outputs):
        size = remove_leftover(tmp) or 0
        log.info("removed %s (%.1f MB), left by an interrupted write", os.path.relpath(tmp, root), size / 1e6)
    model_name = load_params(PackageParams, "package", root / "params.yaml").model_name
    for staging in package_staging(model_name):
        size = remove_leftover(staging) or 0
        log.info("removed %s (%.1f MB), left by an interrupted package", staging, size / 1e6)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Remove what killed runs left: checkpoints, temporaries, staging.")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project (holding dvc.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    from dvc.lock import LockError  # here: importing DVC takes a second
    from dvc.repo import Repo

    with Repo(str(args.repo)) as repo:
        try:
            with repo.lock:  # what a running `dvc repro` writes now is not a leftover
                tidy(repo, Path(repo.root_dir))
        except LockError:
            raise SystemExit(
                f"tidy: a DVC command is running in {Path(repo.root_dir)}: run 'make tidy' when it has ended"
            ) from None


if __name__ == "__main__":
    main()
