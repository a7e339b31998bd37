"""The feature cache: whether training can run on the frozen layers' activations, and reading them back.

Not a stage: the stage `features` writes the cache (`python -m pipeline.stages.features`), `train` and `lr_find` read
it, `pipeline.tools.plan` estimates it. A cache is keyed by what the activations depend on (`cache_key`), so a
change of lr or epochs reuses it and a change of weights or image size is refused with what to run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.params.train import TrainParams

SPLITS = ("train", "valid")


def cache_applies(p: TrainParams) -> str | None:
    """None if training can use cached activations, else why not."""
    if not p.feature_cache:
        return "train.feature_cache is false"
    if p.finetune == "all":
        return None if p.head_epochs > 0 else "train.finetune is 'all' with no head_epochs: nothing is frozen"
    if p.augment:
        return "train.augment is true: augmented images give new activations every epoch"
    return None


def cache_cut(p: TrainParams) -> str:
    """Where the cached activations are taken: the input of what `finetune` trains (fine_tune: the head's)."""
    return "head" if p.finetune == "all" else p.finetune


def head_draw(p: TrainParams) -> int:
    """How many training photos fine_tune's head epochs see (0: all): train.epoch_images, a fixed draw. The unfrozen
    epochs draw that many anew from all of them; the head (a linear layer on pooled features) needs no more, and
    its cache then costs what one unfrozen epoch's draw does, not the whole training set (a third at 18,000)."""
    return p.epoch_images if p.finetune == "all" else 0


def cache_key(p: TrainParams, data: Path) -> str:
    """What the activations depend on: the frozen weights, the preprocessing, the cut, the images."""
    frozen = {"arch": p.arch, "weights": p.weights, "image_size": p.image_size, "finetune": cache_cut(p)}
    frozen["precision"] = p.precision
    if head_draw(p):
        frozen["head_draw"], frozen["seed"] = head_draw(p), p.seed  # which photos are drawn
    if p.weights == "none":
        frozen["seed"] = p.seed  # random weights come from the seed
    h = hashlib.sha256(json.dumps(frozen, sort_keys=True).encode())
    h.update((data / "manifest.csv").read_bytes())
    return h.hexdigest()[:16]


def load_cache(features: Path, p: TrainParams, data: Path) -> dict | None:
    """{split: (activations memmap, labels)} if the cache applies and matches, None if it does not apply."""
    meta_path = features / "meta.json"
    if not meta_path.exists():
        raise SystemExit(f"{meta_path} not found: run 'dvc repro features' first")
    meta = json.loads(meta_path.read_text())
    if cache_applies(p) is not None:
        return None
    if not meta["cached"] or meta["key"] != cache_key(p, data):
        raise SystemExit(f"{features} was computed for other params or data: run 'dvc repro features'")
    return {s: (np.load(features / f"{s}.npy", mmap_mode="r"), np.load(features / f"{s}_labels.npy")) for s in SPLITS}
