"""Stage `features`: the frozen part of the network run once per image, cached for training the rest.

`python -m pipeline.features --member model --data data/prepared --out data/features/model` (run by
`dvc repro features@model`; one stage per member of params.yaml's `members`, here `model`).

With `train.finetune: head` (or `dense`) and no augmentation, every epoch would push each image through
the same frozen layers again: on 2 CPU cores that is ~97% of an epoch's time. This stage computes those
activations once (the course's lesson 2 approach) and writes them as memory-mapped arrays:

    data/features/<member>/train.npy, valid.npy   float32 (N, D): the head's input (VGG16: fc7, D=4096;
                                                  EfficientNet-Lite0: pooled, D=1280) for `head`, the dense
                                                  block's (VGG16: pool5, 25088) for `dense`
    data/features/<member>/train_labels.npy, ...  int64 (N,)
    data/features/<member>/meta.json              the cache key, the cut point, the shapes

`train` then trains only the trainable layers on them; the result equals the uncached path's within
float tolerance (tested). The stage depends only on the params that change the activations (weights,
image size, finetune, seed, augment), so `dvc exp run -S train.lr=...` reuses the cache. With `finetune: all`
and `head_epochs` (fastai's `fine_tune`), it caches the head's input for the head epochs. When the cache
does not apply (`finetune: all` without head epochs, `augment: true` or `feature_cache: false`) it writes only
meta.json saying so, and `train` runs on images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from pipeline.config import load_params, setup_logging
from pipeline.files import atomic_folder
from pipeline.model import (
    CLASSES,
    WeightsError,
    autocast,
    build_model,
    eval_transform,
    frozen_part,
    pick_device,
    preprocessing,
    use_bf16,
)
from pipeline.params.train import FeaturesParams, TrainParams, load_member

log = logging.getLogger("features")
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


def cache_key(p: TrainParams, data: Path) -> str:
    """What the activations depend on: the frozen weights, the preprocessing, the cut, the images."""
    frozen = {"arch": p.arch, "weights": p.weights, "image_size": p.image_size, "finetune": cache_cut(p)}
    frozen["precision"] = p.precision
    if p.weights == "none":
        frozen["seed"] = p.seed  # random weights come from the seed
    h = hashlib.sha256(json.dumps(frozen, sort_keys=True).encode())
    h.update((data / "manifest.csv").read_bytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract(
    trunk: nn.Module, loader: DataLoader, out: np.ndarray, device: torch.device, desc: str, bf16: bool | None = None
) -> None:
    """Write trunk(x) for every batch of `loader` into the (memory-mapped) array `out`, in order (float32 whatever
    `bf16`, the autocast, computed in)."""
    i = 0
    for x, _ in tqdm(loader, desc=desc, mininterval=2):
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        with autocast(device, bf16):
            f = trunk(x).float().cpu().numpy()  # (B, D)
        out[i : i + len(f)] = f
        i += len(f)


def write_cache(data: Path, out: Path, p: TrainParams, fp: FeaturesParams) -> dict:
    """Compute and write the cache into `out`; returns meta.json's contents."""
    reason = cache_applies(p)
    meta = {"cached": reason is None, "reason": reason, "key": cache_key(p, data), "finetune": cache_cut(p)}
    if reason is not None:
        return meta
    device = pick_device(p.device)
    torch.manual_seed(p.seed)  # the same random weights as train builds (weights: none)
    try:
        model = build_model(p.arch, p.weights)
        trunk = frozen_part(model.to(device, memory_format=torch.channels_last), cache_cut(p))
    except WeightsError as e:  # offline without the ImageNet file, a bad train.weights path, dense without one
        raise SystemExit(str(e)) from None
    pre = preprocessing(p.arch, p.image_size)
    t0 = time.perf_counter()
    for split in SPLITS:
        ds = ImageFolder(data / split, transform=eval_transform(pre))
        if tuple(ds.classes) != CLASSES:
            raise SystemExit(f"{ds.root} holds classes {ds.classes}, expected {list(CLASSES)}")
        loader = DataLoader(ds, batch_size=fp.batch_size, num_workers=fp.workers, pin_memory=device.type == "cuda")
        with torch.no_grad():
            dim = trunk(torch.zeros(1, 3, pre["image_size"], pre["image_size"], device=device)).shape[1]
        arr = np.lib.format.open_memmap(out / f"{split}.npy", mode="w+", dtype=np.float32, shape=(len(ds), dim))
        extract(trunk, loader, arr, device, f"features {split}", use_bf16(p.precision, device))
        arr.flush()
        np.save(out / f"{split}_labels.npy", np.array(ds.targets, dtype=np.int64))
        meta[split] = {"n": len(ds), "dim": int(dim)}
    seconds = time.perf_counter() - t0  # logged, not written: the cache's bytes must not vary run to run
    n = sum(meta[s]["n"] for s in SPLITS)
    log.info(
        "%s activations of %d images in %.0fs (%.1f img/s) on %s%s",
        cache_cut(p),
        n,
        seconds,
        n / seconds,
        device,
        " (bf16 autocast)" if use_bf16(p.precision, device) else "",
    )
    return meta


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Cache the frozen layers' activations.")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared")
    parser.add_argument("--out", type=Path, required=True, help="data/features/<member>")
    parser.add_argument("--member", help="params.yaml members.<name>: its overrides of train (none: train alone)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    p = load_member(args.member, args.params)
    fp = load_params(FeaturesParams, "features", args.params)
    if not (args.data / "manifest.csv").exists():
        raise SystemExit(f"{args.data}/manifest.csv not found: run 'dvc repro prepare' first")
    with atomic_folder(args.out) as tmp:  # the cache appears whole, or not at all
        meta = write_cache(args.data, tmp, p, fp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if not meta["cached"]:
        log.info("no cache: %s; train runs on images", meta["reason"])


if __name__ == "__main__":
    main()
