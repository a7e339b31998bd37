"""Stage `train`: fine-tune an ImageNet model on data/prepared, the fast.ai lesson-1 way.

`python -m pipeline.train --member model --data data/prepared --features data/features/model --model
models/model.pt --checkpoint models/model.checkpoint.pt --live dvclive/model` (run by `dvc repro train@model`,
for the member `model`).

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
bytes as an uninterrupted run (a checkpoint left by a run DVC never resumes: pipeline/tidy.py). The final
`models/<member>.pt` holds the weights and everything needed to rebuild the model (arch, classes,
preprocessing, params), so export, predict and serving need nothing else.
Metrics per epoch go through DVCLive (`dvclive/<member>/`); `dvc plots show` draws the learning curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from pipeline.config import setup_logging
from pipeline.features import load_cache
from pipeline.files import atomic_write, remove_leftover, temporary_sibling
from pipeline.model import (
    CLASSES,
    WeightsError,
    autocast,
    build_model,
    frozen_names,
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
    use_bf16,
)
from pipeline.params.train import TrainParams, load_member

log = logging.getLogger("train")


def phases(p: TrainParams) -> list[tuple[str, int, float]]:
    """[(finetune, epochs, peak lr)]: fastai's fine_tune is the head alone first, then everything."""
    if p.finetune == "all" and p.head_epochs > 0:
        return [("head", p.head_epochs, p.head_lr), ("all", p.epochs, p.lr)]
    return [(p.finetune, p.epochs, p.lr)]


ETA_BATCHES = 20  # the first batches of a phase, timed for its estimate (the first few are slower: warm-up)


def train_one_epoch(
    net, loader, optimizer, scheduler, device, desc="train", bf16: bool | None = None, epochs_left: int = 0
) -> float:
    """One pass over `loader` (images, or cached activations for the trainable part); the mean loss. `bf16`: under
    bf16 autocast (None: on CUDA only). `epochs_left` > 0: log an estimate of the phase's time, these epochs
    included, from the first ETA_BATCHES batches."""
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for batch, (x, y) in enumerate(tqdm(loader, desc=desc, leave=False, mininterval=2), 1):
        if epochs_left and batch == ETA_BATCHES + 1 and len(loader) > 2 * ETA_BATCHES:
            per_epoch = (time.perf_counter() - t0) / ETA_BATCHES * len(loader)
            log.info(
                "%s: ~%.1f min an epoch (from its first %d batches), ~%.0f min for the phase's %d epoch(s) left",
                desc, per_epoch / 60, ETA_BATCHES, per_epoch * epochs_left / 60, epochs_left,
            )  # fmt: skip
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        # forward backward update
        with autocast(device, bf16):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(y)  # note: a CPU-GPU sync point, once per batch
        count += len(y)
    return total / count


def validate(model, loader, device, bf16: bool | None = None) -> dict:
    logits, y = predict_logits(model, loader, device, bf16=bf16)
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
    data: Path,
    cache: dict | None,
    p: TrainParams,
    pre: dict,
    device: torch.device,
    gen: torch.Generator,
    fit_on: tuple[str, ...] = ("train",),
) -> tuple[DataLoader, DataLoader]:
    """Loaders over the splits `fit_on` (shuffled, augmented) and over valid, of images or of cached activations
    when `cache` is given. Both paths shuffle with the same seeded generator `gen`, so they see the same batches."""
    if cache is not None:
        fit = [ArrayDataset(*cache[s]) for s in fit_on]
        valid_ds = ArrayDataset(*cache["valid"])
        workers = 0  # reading a memmap row is cheaper than handing it between processes
    else:
        fit = [ImageFolder(data / s, transform=train_transform(pre, p.augment, p.min_scale)) for s in fit_on]
        valid_ds = ImageFolder(data / "valid", transform=train_transform(pre, False))
        for ds in (*fit, valid_ds):
            if tuple(ds.classes) != CLASSES:
                raise SystemExit(f"{ds.root} holds {ds.classes}, expected {list(CLASSES)}: run 'dvc repro prepare'")
        workers = p.workers
    train_ds = fit[0] if len(fit) == 1 else ConcatDataset(fit)
    # no persistent_workers: fresh workers each epoch draw their seeds from `gen`, whose state the checkpoint
    # keeps, so a resumed run augments exactly as an uninterrupted one (persistent ones seed once, at start)
    kw = dict(batch_size=p.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    if cache is None and 0 < p.epoch_images < len(train_ds):  # a new draw of epoch_images each epoch, no repeats
        order = dict(sampler=RandomSampler(train_ds, num_samples=p.epoch_images, generator=gen))
    else:
        order = dict(shuffle=True, generator=gen)
    return (
        DataLoader(train_ds, drop_last=len(train_ds) > p.batch_size, **order, **kw),
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


def fresh_model(p: TrainParams, device: torch.device) -> nn.Module:
    """The arch with `train.weights` and a new head, the same for the same seed (random weights come from it)."""
    torch.manual_seed(p.seed)
    try:
        model = build_model(p.arch, p.weights)
        # an impossible train.finetune (dense without a dense block) or train.frozen_groups (no body left to train)
        trainable_module(model, p.finetune), frozen_names(model, p.finetune, p.frozen_groups)
    except WeightsError as e:  # offline without the ImageNet file, a bad train.weights path, or the above
        raise SystemExit(str(e)) from None
    return model.to(device, memory_format=torch.channels_last)


def make_optimizer(model: nn.Module, p: TrainParams, finetune: str, lr: float, steps: int):
    """AdamW over what `finetune` trains (freezing the rest) and its one-cycle schedule over `steps`."""
    groups = param_groups(model, finetune, lr, p.body_lr_factor, p.frozen_groups)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=p.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=p.warmup, anneal_strategy="cos"
    )
    return optimizer, scheduler


@dataclass
class Run:
    """One training run's state, shared by its steps: what to train, on what, and how far it got."""

    p: TrainParams
    data: Path
    checkpoint: Path
    device: torch.device
    model: nn.Module
    pre: dict  # the arch's preprocessing, from its weights
    cache: dict | None  # the features stage's cached activations, when they apply
    gen: torch.Generator  # the shuffle order: saved in checkpoints
    plan: list[tuple[str, int, float]]  # phases: (finetune, epochs, lr)
    key: str  # params + data: a checkpoint of another key is not resumed
    bf16: bool  # bf16 autocast (train.precision resolved for this device)
    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    resumed: dict | None = None  # the checkpoint resumed from, until its optimizer and RNG states are restored

    @property
    def total(self) -> int:
        return sum(n for _, n, _ in self.plan)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune an ImageNet model.")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared")
    parser.add_argument("--features", type=Path, required=True, help="data/features/<member> (stage features)")
    parser.add_argument("--model", type=Path, required=True, help="the final model file")
    parser.add_argument("--checkpoint", type=Path, required=True, help="per-epoch checkpoint, for resuming")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--member", help="params.yaml members.<name>: its overrides of train (none: train alone)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def start_run(p: TrainParams, data: Path, features: Path, checkpoint: Path) -> Run:
    """Seeds, the device, the model as `features` built it, the cache and the plan."""
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
    run = Run(
        p=p,
        data=data,
        checkpoint=checkpoint,
        device=device,
        model=fresh_model(p, device),  # seeds torch first: the same random weights as features built
        pre=preprocessing(p.arch, p.image_size),
        cache=load_cache(features, p, data),
        gen=torch.Generator().manual_seed(p.seed),
        plan=phases(p),
        key=run_key(p, data),
        bf16=use_bf16(p.precision, device),
    )
    log.info(
        "%s, weights %s; %s; %s",
        p.arch,
        p.weights,
        " then ".join(f"{finetune} for {n} epochs at lr {lr:g}" for finetune, n, lr in run.plan),
        "bf16 autocast" if run.bf16 else "fp32",
    )
    return run


def resume(run: Run) -> None:
    """Continue an interrupted run of the same params on the same data from its checkpoint, if there is one."""
    if not run.checkpoint.exists():
        return
    ckpt = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
    if ckpt["run_key"] != run.key:
        log.info("ignoring %s: it belongs to other params or data", run.checkpoint)
        return
    run.epochs_done, run.history, run.best = ckpt["epoch"], same_keys(ckpt["history"]), ckpt["best"]
    load_trained_state(run.model, ckpt["model"], ckpt["finetune"])
    run.resumed = ckpt
    log.info("resuming from %s after epoch %d of %d", run.checkpoint, run.epochs_done, run.total)


def log_epoch(live, metrics: dict) -> None:
    for name, value in metrics.items():
        live.log_metric(name, value)
    live.next_step()


def train_phase(run: Run, live, phase: int, first: int) -> None:
    """The epochs of one phase that are not done yet; `first` is its first epoch, counted over all phases. After
    every epoch, a checkpoint holding everything needed to continue exactly there."""
    p, (finetune, epochs, lr) = run.p, run.plan[phase]
    # cached activations serve a phase that trains only what the cache stops at (the head)
    on_cache = run.cache is not None and finetune != "all"
    train_loader, valid_loader = make_loaders(
        run.data, run.cache if on_cache else None, p, run.pre, run.device, run.gen
    )
    net = trainable_part(run.model, finetune) if on_cache else run.model
    if p.compile:
        net = torch.compile(net)  # compiles at the first batch (inductor: needs a C++ compiler on CPU)
        log.info("torch.compile: on (%s)", type(net).__name__)
    optimizer, scheduler = make_optimizer(run.model, p, finetune, lr, epochs * len(train_loader))
    ckpt = run.resumed
    if ckpt is not None and ckpt["phase"] == phase and run.epochs_done > first:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt is not None:
        set_rng_state(ckpt["rng"], run.gen)
        run.resumed = None  # restored once, where the run stopped
    log.info(
        "%s: %d trainable parameters on %s; %d train / %d valid images",
        finetune,
        sum(q.numel() for q in run.model.parameters() if q.requires_grad),
        "cached activations" if on_cache else "images" + (" (augmented)" if p.augment else ""),
        len(train_loader.dataset),
        len(valid_loader.dataset),
    )
    for epoch in range(max(run.epochs_done, first), first + epochs):
        t0 = time.perf_counter()
        set_train_mode(run.model, finetune, p.freeze_bn, p.frozen_groups)
        left = first + epochs - epoch if epoch == max(run.epochs_done, first) else 0  # the phase's first epoch here
        train_loss = train_one_epoch(
            net, train_loader, optimizer, scheduler, run.device, f"{finetune} epoch {epoch + 1}", run.bf16, left
        )
        metrics = {"train_loss": train_loss, **validate(net, valid_loader, run.device, run.bf16)}
        run.history.append(metrics)
        log_epoch(live, metrics)
        if run.best is None or p.keep == "last" or metrics["valid_log_loss"] < run.best["valid_log_loss"]:
            run.best = {"epoch": epoch + 1, "valid_log_loss": metrics["valid_log_loss"], "finetune": finetune}
            run.best["state"] = trained_state(run.model, finetune)
        checkpoint = {
            "run_key": run.key,
            "epoch": epoch + 1,
            "phase": phase,
            "finetune": finetune,
            "model": trained_state(run.model, finetune),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(run.gen),
            "history": run.history,
            "best": run.best,
        }
        atomic_save(checkpoint, run.checkpoint)
        log.info(
            "epoch %d/%d  train_loss %.4f  valid_acc %.4f  valid_log_loss %.4f  %.0fs",
            epoch + 1, run.total, train_loss, metrics["valid_accuracy"], metrics["valid_log_loss"],
            time.perf_counter() - t0,
        )  # fmt: skip


def refit(run: Run) -> nn.Module:
    """Train again from the start on train + valid, the same plan and schedules stopped at the kept epoch: the model
    submitted and served has seen 20% more images. Nothing is left to validate it on, so the kept epoch's model
    gives the validation figures and the calibration. Not checkpointed: a killed refit starts over."""
    p, stop = run.p, run.best["epoch"]
    model, gen = fresh_model(p, run.device), torch.Generator().manual_seed(p.seed)
    first = 0
    for finetune, epochs, lr in run.plan:
        on_cache = run.cache is not None and finetune != "all"
        loader, _ = make_loaders(
            run.data, run.cache if on_cache else None, p, run.pre, run.device, gen, ("train", "valid")
        )
        net = trainable_part(model, finetune) if on_cache else model
        net = torch.compile(net) if p.compile else net
        # the whole phase's schedule, so each epoch trains at the learning rates the kept run's epoch did
        optimizer, scheduler = make_optimizer(model, p, finetune, lr, epochs * len(loader))
        for epoch in range(first, min(first + epochs, stop)):
            t0 = time.perf_counter()
            set_train_mode(model, finetune, p.freeze_bn, p.frozen_groups)
            desc = f"refit {finetune} epoch {epoch + 1}"
            loss = train_one_epoch(net, loader, optimizer, scheduler, run.device, desc, run.bf16)
            log.info("refit epoch %d/%d on %d images (%s)  train_loss %.4f  %.0fs",
                     epoch + 1, stop, len(loader.dataset), finetune, loss, time.perf_counter() - t0)  # fmt: skip
        first += epochs
    return model


def kept_model(run: Run) -> nn.Module:
    """The kept epoch's full model: the best by validation log loss, or the last."""
    p, best = run.p, run.best
    # a later phase changed more than the best epoch's phase trained, so rebuild from the weights
    model = fresh_model(p, run.device) if best["finetune"] != run.plan[-1][0] else run.model
    load_trained_state(model, best["state"], best["finetune"])
    log.info("keeping epoch %d (%s: validation log loss %.4f)", best["epoch"], p.keep, best["valid_log_loss"])
    return model


def save_model(run: Run, kept: nn.Module, refitted: nn.Module | None, path: Path) -> None:
    """Write the submitted model (the refit, or the kept epoch's) with what export needs; after a refit, the kept
    epoch's weights too, as `validated_model`: what evaluate scores and calibrates."""
    p, best = run.p, run.best
    weights = [("model", kept)] if refitted is None else [("model", refitted), ("validated_model", kept)]
    saved = {
        **{name: {k: v.float().cpu() for k, v in m.state_dict().items()} for name, m in weights},
        **run.pre,  # arch, image_size, resize_size, interpolation, mean, std: what export writes into the ONNX model
        "classes": CLASSES,
        "weights": p.weights,
        "params": dataclasses.asdict(p),
        "run_key": run.key,
        "history": run.history,
        "best_epoch": best["epoch"],
        "refit": refitted is not None,  # model: trained on train + valid for best_epoch epochs
    }
    atomic_save(saved, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    p = load_member(args.member, args.params)
    if not (args.data / "manifest.csv").exists():
        raise SystemExit(f"{args.data}/manifest.csv not found: run 'dvc repro prepare' first")
    if args.model.exists():  # as dvc repro does: a model beside a checkpoint means its run was abandoned (tidy.py)
        args.model.unlink()
        log.info("removed the previous %s", args.model)
    for tmp in (temporary_sibling(args.model), temporary_sibling(args.checkpoint)):  # a SIGKILL during a save
        if (size := remove_leftover(tmp)) is not None:  # a 174 MB model, a checkpoint up to 1.6 GB: free it first
            log.info("removed %s (%.1f MB), left by an interrupted write", tmp, size / 1e6)
    run = start_run(p, args.data, args.features, args.checkpoint)
    resume(run)
    args.model.parent.mkdir(parents=True, exist_ok=True)
    from dvclive import Live  # here, not at the top: the benches import this module where DVC is not installed

    with Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None) as live:
        for metrics in run.history:  # DVC removed the curves of the resumed epochs: rebuild them from the checkpoint
            log_epoch(live, metrics)
        first = 0  # the phase's first epoch, counted over all phases
        for phase, (_, epochs, _) in enumerate(run.plan):
            if run.epochs_done < first + epochs:  # else the checkpoint has finished this phase
                train_phase(run, live, phase, first)
            first += epochs
        log_curves(live, run.history)
    kept = kept_model(run)
    save_model(run, kept, refit(run) if p.refit else None, args.model)
    args.checkpoint.unlink(missing_ok=True)  # finished: the next run with other params starts fresh
    log.info("wrote %s", args.model)


if __name__ == "__main__":
    main()
