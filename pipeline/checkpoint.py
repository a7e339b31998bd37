"""Checkpoints of a training run: what is saved after every epoch and what a resumed run must match.

Not a stage: `train` saves a checkpoint atomically after each epoch (only what trains, with the optimizer, schedule
and RNG states) and resumes one whose `run_key` (params and prepared data) matches; `pipeline.tools.tidy` removes the
checkpoints no run will resume. A resumed run ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.files import atomic_write, remove_leftover, temporary_sibling
from pipeline.model import (
    is_trainable,
    trainable_module,
)
from pipeline.params.train import TrainParams

log = logging.getLogger("train")


def run_key(p: TrainParams, data: Path) -> str:
    """What a checkpoint must match to be resumed: the params and the prepared data's manifest."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(p), sort_keys=True).encode())
    h.update((data / "manifest.csv").read_bytes())
    weights = Path(p.weights).expanduser()
    if p.weights not in ("imagenet", "none") and weights.is_file():  # frozen layers are rebuilt from it on resume
        stat = weights.stat()
        h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically: an interrupted save never leaves a half-written file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def trained_state(model: nn.Module, finetune: str) -> dict:
    """The part of the state dict that `finetune` changes (a copy); the rest comes from the weights and the seed."""
    prefix = trainable_module(model, finetune)
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if is_trainable(k, prefix)}


def load_trained_state(model: nn.Module, state: dict, finetune: str) -> None:
    """Put a `trained_state` back; anything else missing must be a frozen layer."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    trained = [k for k in missing if is_trainable(k, trainable_module(model, finetune))]
    if trained or unexpected:
        raise SystemExit(f"checkpoint does not fit the model: missing {trained}, unexpected {unexpected}")


def same_keys(history: list[dict]) -> list[dict]:
    """History read back from a checkpoint, with the metric names as the interned strings a fresh run uses: pickle
    writes a shared string once, so otherwise a resumed run's model.pt would differ from an uninterrupted one's."""
    return [{sys.intern(k): v for k, v in metrics.items()} for metrics in history]


def rng_state(gen: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "loader": gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["loader"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def train_arguments(argv=None) -> argparse.Namespace:
    """The train stage's command line: the stage parses it, and `pipeline.tools.tidy` reads each run's checkpoint and
    model paths from dvc.yaml's train commands with it."""
    parser = argparse.ArgumentParser(description="Fine-tune an ImageNet model.")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared")
    parser.add_argument("--features", type=Path, required=True, help="data/features/<member> (stage features)")
    parser.add_argument("--model", type=Path, required=True, help="the final model file")
    parser.add_argument("--checkpoint", type=Path, required=True, help="per-epoch checkpoint, for resuming")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--member", help="params.yaml members.<name>: its overrides of train (none: train alone)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def remove_leftovers(model: Path, checkpoint: Path) -> None:
    """Before a run, what an abandoned or killed one left: a model beside a checkpoint, half-written files."""
    if model.exists():  # a model beside a checkpoint means its run was abandoned (make tidy)
        model.unlink()
        log.info("removed the previous %s", model)
    for tmp in (temporary_sibling(model), temporary_sibling(checkpoint)):  # a SIGKILL during a save
        if (size := remove_leftover(tmp)) is not None:  # a 174 MB model, a checkpoint up to 1.6 GB: free it first
            log.info("removed %s (%.1f MB), left by an interrupted write", tmp, size / 1e6)
