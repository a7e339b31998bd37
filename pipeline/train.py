"""Stage `train`: fine-tune VGG16 on data/prepared, the fast.ai lesson-1 way.

`python -m pipeline.train --data data/prepared --model models/model.pt --checkpoint
models/train-checkpoint.pt --live dvclive` (run by `dvc repro train`).

`train.finetune` picks what trains: `head` (the lesson: only the new 2-way layer), `dense` (all fully
connected layers) or `all` (conv layers too, at `lr * conv_lr_factor`). AdamW with a one-cycle schedule
(warm-up, then cosine decay). Runs on CUDA when available (bf16 autocast, channels_last), else CPU.

A checkpoint is written atomically after every epoch, holding only what trains (the head's 8,194
parameters for `head`, not VGG16's 537 MB) with the optimizer, schedule and RNG states; the frozen
layers are rebuilt from `train.weights` and the seed. An interrupted run (Ctrl-C, kill) resumes from
it on the next `dvc repro`, if the params and the prepared data are unchanged, and ends with the same
weights as an uninterrupted run. The final `models/model.pt` holds the weights and everything needed to
rebuild the model (classes, preprocessing, params), so export, predict and serving need nothing else.
Metrics per epoch go through DVCLive (`dvclive/`); `dvc plots show` draws the learning curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from pipeline.config import TrainParams, load_params
from pipeline.features import load_cache, trainable_part
from pipeline.model import (
    CLASSES,
    MEAN,
    STD,
    WeightsError,
    autocast,
    build_model,
    eval_transform,
    param_groups,
    pick_device,
    predict_logits,
    resize_size,
    to_device,
    train_transform,
    trainable_prefixes,
)

log = logging.getLogger("train")


def set_train_mode(model: nn.Module, finetune: str) -> None:
    """Train mode for what trains; frozen layers stay in eval mode (no dropout: fixed features)."""
    model.train()
    if finetune == "head":
        model.features.eval()
        model.classifier[:6].eval()
    elif finetune == "dense":
        model.features.eval()


def train_one_epoch(net, loader, optimizer, scheduler, device, desc="train") -> float:
    """One pass over `loader` (images, or cached activations for the trainable part); the mean loss."""
    total, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, mininterval=2):
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        # forward backward update
        with autocast(device):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(y)  # note: a CPU-GPU sync point, once per batch
        count += len(y)
    return total / count


def validate(model, loader, device) -> dict:
    logits, y = predict_logits(model, loader, device)
    t = torch.from_numpy(logits)
    p_dog = torch.softmax(t, 1)[:, 1].numpy()
    return {
        "valid_loss": float(F.cross_entropy(t, torch.from_numpy(y))),
        "valid_accuracy": float(np.mean(logits.argmax(1) == y)),
        "valid_log_loss": float(log_loss(y, p_dog, labels=[0, 1])),
    }


class ArrayDataset(Dataset):
    """Rows of a (memory-mapped) activations array, with their labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])  # np.array: copy out of the memmap


def make_loaders(data: Path, cache: dict | None, p: TrainParams, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Train and valid loaders over images, or over cached activations when `cache` is given.
    Both shuffle with the same seeded generator, so both paths see the same batches."""
    if cache is not None:
        train_ds, valid_ds = (ArrayDataset(*cache[s]) for s in ("train", "valid"))
        workers = 0  # reading a memmap row is cheaper than handing it between processes
    else:
        train_ds = ImageFolder(data / "train", transform=train_transform(p.image_size, p.augment))
        valid_ds = ImageFolder(data / "valid", transform=eval_transform(p.image_size))
        for ds in (train_ds, valid_ds):
            if tuple(ds.classes) != CLASSES:
                raise SystemExit(f"{ds.root} holds {ds.classes}, expected {list(CLASSES)}: run 'dvc repro prepare'")
        workers = p.workers
    gen = torch.Generator().manual_seed(p.seed)  # the shuffle order: saved in checkpoints
    # no persistent_workers: fresh workers each epoch draw their seeds from `gen`, whose state the checkpoint
    # keeps, so a resumed run augments exactly as an uninterrupted one (persistent ones seed once, at start)
    kw = dict(batch_size=p.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    return (
        DataLoader(train_ds, shuffle=True, generator=gen, drop_last=len(train_ds) > p.batch_size, **kw),
        DataLoader(valid_ds, shuffle=False, **kw),
    )


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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # an interrupted save never leaves a half-written file


def trained_state(model: nn.Module, finetune: str) -> dict:
    """The part of the state dict that training changes; the rest is rebuilt from the weights and the seed."""
    prefixes = trainable_prefixes(finetune)
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


def load_trained_state(model: nn.Module, state: dict, finetune: str) -> None:
    """Put a checkpoint's `trained_state` back; anything else missing must be a frozen layer."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    trained = [k for k in missing if k.startswith(trainable_prefixes(finetune))]
    if trained or unexpected:
        raise SystemExit(f"checkpoint does not fit the model: missing {trained}, unexpected {unexpected}")


def rng_state(loader: DataLoader) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "loader": loader.generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict, loader: DataLoader) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    loader.generator.set_state(state["loader"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune VGG16.")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared")
    parser.add_argument("--features", type=Path, required=True, help="data/features (stage features)")
    parser.add_argument("--model", type=Path, required=True, help="the final model file")
    parser.add_argument("--checkpoint", type=Path, required=True, help="per-epoch checkpoint, for resuming")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = load_params(TrainParams, "train", args.params)
    if not (args.data / "manifest.csv").exists():
        raise SystemExit(f"{args.data}/manifest.csv not found: run 'dvc repro prepare' first")

    torch.manual_seed(p.seed)
    random.seed(p.seed)
    np.random.seed(p.seed)
    device = pick_device(p.device)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    log.info(
        "device %s%s, torch %s, %d CPU threads",
        device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
        torch.__version__,
        torch.get_num_threads(),
    )
    cache = load_cache(args.features, p, args.data)
    train_loader, valid_loader = make_loaders(args.data, cache, p, device)
    try:
        model = build_model(p.weights)
    except WeightsError as e:  # offline without the ImageNet file, or a bad train.weights path
        raise SystemExit(str(e)) from None
    model = model.to(device, memory_format=torch.channels_last)
    # what the batches go through: the whole network, or only its trainable part on cached activations
    net = model if cache is None else trainable_part(model, p.finetune)
    if p.compile:
        net = torch.compile(net)  # compiles at the first batch (inductor: needs a C++ compiler on CPU)
        log.info("torch.compile: on (%s)", type(net).__name__)
    log.info("training on %s", "images" if cache is None else f"cached activations in {args.features}")
    groups = param_groups(model, p.finetune, p.lr, p.conv_lr_factor)
    optimizer = torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay)
    steps = p.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=p.warmup, anneal_strategy="cos"
    )
    n_train = sum(p.numel() for g in groups for p in g["params"])
    log.info(
        "finetune=%s: %d trainable parameters; %d train / %d valid images, %d steps",
        p.finetune,
        n_train,
        len(train_loader.dataset),
        len(valid_loader.dataset),
        steps,
    )

    # resume an interrupted run of the same params on the same data
    key, start, history = run_key(p, args.data), 0, []
    if args.checkpoint.exists():
        ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
        if ckpt["run_key"] == key:
            load_trained_state(model, ckpt["model"], p.finetune)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"], train_loader)
            start, history = ckpt["epoch"], ckpt["history"]
            log.info("resuming from %s after epoch %d of %d", args.checkpoint, start, p.epochs)
        else:
            log.info("ignoring %s: it belongs to other params or data", args.checkpoint)

    args.model.parent.mkdir(parents=True, exist_ok=True)
    from dvclive import Live  # here, not at the top: the benches import this module where DVC is not installed

    # DVC removes the stage's outputs before a rerun: rebuild the curves of resumed epochs from the checkpoint
    with Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None) as live:
        for metrics in history:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
        for epoch in range(start, p.epochs):
            t0 = time.perf_counter()
            set_train_mode(model, p.finetune)
            desc = f"epoch {epoch + 1}/{p.epochs}"
            train_loss = train_one_epoch(net, train_loader, optimizer, scheduler, device, desc)
            metrics = {"train_loss": train_loss, **validate(net, valid_loader, device)}
            history.append(metrics)
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
            # checkpoint: everything needed to continue exactly here
            atomic_save(
                {
                    "run_key": key,
                    "epoch": epoch + 1,
                    "model": trained_state(model, p.finetune),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(train_loader),
                    "history": history,
                    "params": dataclasses.asdict(p),
                    "classes": CLASSES,
                },
                args.checkpoint,
            )
            log.info(
                "epoch %d/%d  train_loss %.4f  valid_loss %.4f  valid_acc %.4f  valid_log_loss %.4f  %.0fs",
                epoch + 1,
                p.epochs,
                train_loss,
                metrics["valid_loss"],
                metrics["valid_accuracy"],
                metrics["valid_log_loss"],
                time.perf_counter() - t0,
            )

    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    atomic_save(
        {
            "model": state,
            "arch": "vgg16",
            "classes": CLASSES,
            "image_size": p.image_size,
            "resize_size": resize_size(p.image_size),
            "mean": MEAN,
            "std": STD,
            "weights": p.weights,
            "params": dataclasses.asdict(p),
            "run_key": key,
            "history": history,
        },
        args.model,
    )
    args.checkpoint.unlink(missing_ok=True)  # finished: the next run with other params starts fresh
    log.info("wrote %s", args.model)


if __name__ == "__main__":
    main()
