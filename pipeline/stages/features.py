"""Stage `features`: the frozen part of the network run once per image, cached for training the rest.

`python -m pipeline.stages.features --member model --data data/prepared --out data/features/model` (run by
`dvc repro features@model`; one stage per member of params.yaml's `members`, here `model`). With `train.finetune:
head` or `dense` (no augmentation), or fastai's `fine_tune` (`all` with `head_epochs`: the head epochs, on a draw of
`train.epoch_images` photos when set), every epoch would push each image through the same frozen layers again; this
stage computes those activations once and writes them as memory-mapped arrays (`train.npy`, `valid.npy`, their
labels, `meta.json` with the cache key), which `train` reads through `pipeline.feature_cache`. When no cache applies,
it writes only `meta.json` saying why, and `train` runs on images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from pipeline.config import load_params, setup_logging
from pipeline.distributed import ONE, barrier, finish, launch, rank_device, start, under_torchrun
from pipeline.feature_cache import SPLITS, cache_applies, cache_cut, cache_key, head_draw
from pipeline.files import atomic_folder, temporary_sibling
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


def write_cache(data: Path, out: Path, p: TrainParams, fp: FeaturesParams, device: torch.device, ranks=ONE) -> dict:
    """Compute and write the cache into `out`; returns meta.json's contents. With several ranks, each computes a
    contiguous block of every split's rows into the one array rank 0 creates."""
    reason = cache_applies(p)
    meta = {"cached": reason is None, "reason": reason, "key": cache_key(p, data), "finetune": cache_cut(p)}
    if reason is not None:
        return meta
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
        labels = np.array(ds.targets, dtype=np.int64)
        if split == "train" and 0 < head_draw(p) < len(ds):  # the same draw whenever the key is the same
            keep = np.sort(np.random.default_rng(p.seed).choice(len(ds), head_draw(p), replace=False))
            ds, labels = Subset(ds, keep.tolist()), labels[keep]
        with torch.no_grad():
            dim = trunk(torch.zeros(1, 3, pre["image_size"], pre["image_size"], device=device)).shape[1]
        if ranks.main:
            np.lib.format.open_memmap(out / f"{split}.npy", mode="w+", dtype=np.float32, shape=(len(ds), dim)).flush()
        barrier(ranks)  # the array exists: each rank writes its block of rows
        rows = np.array_split(np.arange(len(ds)), ranks.world)[ranks.rank]
        arr = np.load(out / f"{split}.npy", mmap_mode="r+")[rows[0] : rows[-1] + 1] if len(rows) else None
        loader = DataLoader(Subset(ds, rows.tolist()) if ranks.joined else ds, batch_size=fp.batch_size,
                            num_workers=fp.workers, pin_memory=device.type == "cuda")  # fmt: skip
        if arr is not None:
            extract(trunk, loader, arr, device, f"features {split}", use_bf16(p.precision, device))
            arr.flush()
        barrier(ranks)
        if ranks.main:
            np.save(out / f"{split}_labels.npy", labels)
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
    if (p.nproc > 1 or p.nnodes > 1) and cache_applies(p) is None and not under_torchrun():  # in train.nproc
        argv = sys.argv[1:] if argv is None else argv
        launch(__spec__.name, argv, p.nproc, p.nnodes, p.rdzv_endpoint, f"features-{args.member or 'train'}")
        return
    device = pick_device(p.device)
    ranks = start(device)
    device = rank_device(device, ranks)
    if ranks.main:
        with atomic_folder(args.out) as tmp:  # the cache appears whole, or not at all
            barrier(ranks)  # the folder exists: the other ranks write into it
            meta = write_cache(args.data, tmp, p, fp, device, ranks)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if not meta["cached"]:
            log.info("no cache: %s; train runs on images", meta["reason"])
    else:
        barrier(ranks)
        write_cache(args.data, temporary_sibling(args.out), p, fp, device, ranks)
    finish(ranks)


if __name__ == "__main__":
    main()
