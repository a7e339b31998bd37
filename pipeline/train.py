"""Stage `train`: fine-tune an ImageNet model on data/prepared, the fast.ai lesson-1 way.

`python -m pipeline.train --data data/prepared --model models/model.pt --checkpoint
models/train-checkpoint.pt --live dvclive` (run by `dvc repro train`).

`train.arch` is any torchvision or timm model (pipeline/model.py); `train.finetune` picks what trains:
`head` (the lesson: only the new 2-way layer), `dense` (the arch's dense block: VGG16's fc6-fc8) or `all`
(the body too, at `lr * body_lr_factor`). With `all` and `head_epochs`, it is fastai's `fine_tune`: the
head first (on cached activations), then everything with augmentation and discriminative learning rates.
AdamW with a one-cycle schedule per phase. Runs on CUDA when available (bf16 autocast, channels_last), else
CPU. The epoch with the lowest validation log loss is kept (`keep: best`): log loss punishes the
over-confidence that later epochs grow.

A checkpoint is written atomically after every epoch, holding only what trains (the head's 8,194
parameters for VGG16's `head`, not its 537 MB) with the optimizer, schedule and RNG states; the frozen
layers are rebuilt from `train.weights` and the seed. An interrupted run (Ctrl-C, kill) resumes from
it on the next `dvc repro`, if the params and the prepared data are unchanged, and ends with the same
bytes as an uninterrupted run. The final `models/model.pt` holds the weights and everything needed to
rebuild the model (arch, classes, preprocessing, params), so export, predict and serving need nothing else.
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
import sys
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

from pipeline.features import load_cache
from pipeline.model import (
    CLASSES,
    WeightsError,
    autocast,
    build_model,
    is_trainable,
    param_groups,
    pick_device,
    predict_logits,
    preprocessing,
    set_train_mode,
    to_device,
    train_transform,
    trainable_module,
    trainable_part,
)
from pipeline.params.train import TrainParams, load_member

log = logging.getLogger("train")


def phases(p: TrainParams) -> list[tuple[str, int, float]]:
    """[(finetune, epochs, peak lr)]: fastai's fine_tune is the head alone first, then everything."""
    if p.finetune == "all" and p.head_epochs > 0:
        return [("head", p.head_epochs, p.head_lr), ("all", p.epochs, p.lr)]
    return [(p.finetune, p.epochs, p.lr)]


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
    # no separate valid cross-entropy: with two classes it is this log loss (the same curve drawn twice)
    return {
        "valid_accuracy": float(np.mean(logits.argmax(1) == y)),
        "valid_log_loss": float(log_loss(y, p_dog, labels=[0, 1])),
    }


def log_curves(live, history: list[dict]) -> None:
    """The learning curves `dvc plots show` draws, x the epoch counted from 1: train and valid loss in one file in
    long format (a DVC stage plot reads one y column; .dvc/plots/curves.json draws a line per `curve`), and the
    valid accuracy."""
    loss = [
        {"epoch": epoch, "curve": curve, "loss": m[key]}
        for epoch, m in enumerate(history, 1)
        for curve, key in (("train", "train_loss"), ("valid", "valid_log_loss"))
    ]
    accuracy = [{"epoch": epoch, "valid_accuracy": m["valid_accuracy"]} for epoch, m in enumerate(history, 1)]
    live.log_plot("loss", loss, x="epoch", y="loss")  # <--live>/plots/custom/loss.json
    live.log_plot("accuracy", accuracy, x="epoch", y="valid_accuracy")  # <--live>/plots/custom/accuracy.json


class ArrayDataset(Dataset):
    """Rows of a (memory-mapped) activations array, with their labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])  # np.array: copy out of the memmap


def make_loaders(
    data: Path, cache: dict | None, p: TrainParams, pre: dict, device: torch.device, gen: torch.Generator
) -> tuple[DataLoader, DataLoader]:
    """Train and valid loaders over images, or over cached activations when `cache` is given.
    Both shuffle with the same seeded generator `gen`, so both paths see the same batches."""
    if cache is not None:
        train_ds, valid_ds = (ArrayDataset(*cache[s]) for s in ("train", "valid"))
        workers = 0  # reading a memmap row is cheaper than handing it between processes
    else:
        train_ds = ImageFolder(data / "train", transform=train_transform(pre, p.augment, p.min_scale))
        valid_ds = ImageFolder(data / "valid", transform=train_transform(pre, False))
        for ds in (train_ds, valid_ds):
            if tuple(ds.classes) != CLASSES:
                raise SystemExit(f"{ds.root} holds {ds.classes}, expected {list(CLASSES)}: run 'dvc repro prepare'")
        workers = p.workers
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


def trained_state(model: nn.Module, arch: str, finetune: str) -> dict:
    """The part of the state dict that `finetune` changes (a copy); the rest comes from the weights and the seed."""
    prefix = trainable_module(model, arch, finetune)
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if is_trainable(k, prefix)}


def load_trained_state(model: nn.Module, state: dict, arch: str, finetune: str) -> None:
    """Put a `trained_state` back; anything else missing must be a frozen layer."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    trained = [k for k in missing if is_trainable(k, trainable_module(model, arch, finetune))]
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


def fresh_model(p: TrainParams, device: torch.device) -> nn.Module:
    """The arch with `train.weights` and a new head, the same for the same seed (random weights come from it)."""
    torch.manual_seed(p.seed)
    try:
        model = build_model(p.arch, p.weights)
    except WeightsError as e:  # offline without the ImageNet file, or a bad train.weights path
        raise SystemExit(str(e)) from None
    return model.to(device, memory_format=torch.channels_last)


def make_optimizer(model: nn.Module, p: TrainParams, finetune: str, lr: float, steps: int):
    """AdamW over what `finetune` trains (freezing the rest) and its one-cycle schedule over `steps`."""
    groups = param_groups(model, p.arch, finetune, lr, p.body_lr_factor)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=p.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=p.warmup, anneal_strategy="cos"
    )
    return optimizer, scheduler


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune an ImageNet model.")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared")
    parser.add_argument("--features", type=Path, required=True, help="data/features (stage features)")
    parser.add_argument("--model", type=Path, required=True, help="the final model file")
    parser.add_argument("--checkpoint", type=Path, required=True, help="per-epoch checkpoint, for resuming")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--member", help="params.yaml members.<name>: its overrides of train (none: train alone)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = load_member(args.member, args.params)
    if not (args.data / "manifest.csv").exists():
        raise SystemExit(f"{args.data}/manifest.csv not found: run 'dvc repro prepare' first")

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
    model = fresh_model(p, device)  # seeds torch first: the same random weights as features built
    pre = preprocessing(p.arch, p.image_size)
    cache = load_cache(args.features, p, args.data)
    gen = torch.Generator().manual_seed(p.seed)  # the shuffle order: saved in checkpoints
    plan = phases(p)
    total = sum(n for _, n, _ in plan)
    log.info(
        "%s, %s; %s",
        p.arch,
        "weights " + p.weights,
        " then ".join(f"{finetune} for {n} epochs at lr {lr:g}" for finetune, n, lr in plan),
    )

    # resume an interrupted run of the same params on the same data
    key, start, history, best = run_key(p, args.data), 0, [], None
    ckpt = None
    if args.checkpoint.exists():
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        if ckpt["run_key"] == key:
            start, history, best = ckpt["epoch"], same_keys(ckpt["history"]), ckpt["best"]
            load_trained_state(model, ckpt["model"], p.arch, ckpt["finetune"])
            log.info("resuming from %s after epoch %d of %d", args.checkpoint, start, total)
        else:
            log.info("ignoring %s: it belongs to other params or data", args.checkpoint)
            ckpt = None

    args.model.parent.mkdir(parents=True, exist_ok=True)
    from dvclive import Live  # here, not at the top: the benches import this module where DVC is not installed

    # DVC removes the stage's outputs before a rerun: rebuild the curves of resumed epochs from the checkpoint
    with Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None) as live:
        for metrics in history:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
        first = 0  # the phase's first epoch, counted over all phases
        for phase, (finetune, epochs, lr) in enumerate(plan):
            if start >= first + epochs:
                first += epochs
                continue  # a phase the checkpoint has finished
            # cached activations serve a phase that trains only what the cache stops at (the head)
            on_cache = cache is not None and finetune != "all"
            train_loader, valid_loader = make_loaders(args.data, cache if on_cache else None, p, pre, device, gen)
            net = trainable_part(model, p.arch, finetune) if on_cache else model
            if p.compile:
                net = torch.compile(net)  # compiles at the first batch (inductor: needs a C++ compiler on CPU)
                log.info("torch.compile: on (%s)", type(net).__name__)
            optimizer, scheduler = make_optimizer(model, p, finetune, lr, epochs * len(train_loader))
            if ckpt is not None and ckpt["phase"] == phase and start > first:
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt is not None and start > 0:
                set_rng_state(ckpt["rng"], gen)
                ckpt = None  # restored once, where the run stopped
            log.info(
                "%s: %d trainable parameters on %s; %d train / %d valid images",
                finetune,
                sum(q.numel() for q in model.parameters() if q.requires_grad),
                "cached activations" if on_cache else "images" + (" (augmented)" if p.augment else ""),
                len(train_loader.dataset),
                len(valid_loader.dataset),
            )
            for epoch in range(max(start, first), first + epochs):
                t0 = time.perf_counter()
                set_train_mode(model, p.arch, finetune, p.freeze_bn)
                desc = f"{finetune} epoch {epoch + 1}"
                train_loss = train_one_epoch(net, train_loader, optimizer, scheduler, device, desc)
                metrics = {"train_loss": train_loss, **validate(net, valid_loader, device)}
                history.append(metrics)
                for name, value in metrics.items():
                    live.log_metric(name, value)
                live.next_step()
                if best is None or p.keep == "last" or metrics["valid_log_loss"] < best["valid_log_loss"]:
                    best = {"epoch": epoch + 1, "valid_log_loss": metrics["valid_log_loss"], "finetune": finetune}
                    best["state"] = trained_state(model, p.arch, finetune)
                # checkpoint: everything needed to continue exactly here
                atomic_save(
                    {
                        "run_key": key,
                        "epoch": epoch + 1,
                        "phase": phase,
                        "finetune": finetune,
                        "model": trained_state(model, p.arch, finetune),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(gen),
                        "history": history,
                        "best": best,
                    },
                    args.checkpoint,
                )
                log.info(
                    "epoch %d/%d  train_loss %.4f  valid_acc %.4f  valid_log_loss %.4f  %.0fs",
                    epoch + 1,
                    total,
                    train_loss,
                    metrics["valid_accuracy"],
                    metrics["valid_log_loss"],
                    time.perf_counter() - t0,
                )
            first += epochs
        log_curves(live, history)

    # the kept epoch: a later phase changed more than the best epoch's phase trained, so rebuild from the weights
    if best["finetune"] != plan[-1][0]:
        model = fresh_model(p, device)
    load_trained_state(model, best["state"], p.arch, best["finetune"])
    log.info("keeping epoch %d (%s: validation log loss %.4f)", best["epoch"], p.keep, best["valid_log_loss"])
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    atomic_save(
        {
            "model": state,
            **pre,  # arch, image_size, resize_size, interpolation, mean, std: what export writes into the ONNX model
            "classes": CLASSES,
            "weights": p.weights,
            "params": dataclasses.asdict(p),
            "run_key": key,
            "history": history,
            "best_epoch": best["epoch"],
        },
        args.model,
    )
    args.checkpoint.unlink(missing_ok=True)  # finished: the next run with other params starts fresh
    log.info("wrote %s", args.model)


if __name__ == "__main__":
    main()
