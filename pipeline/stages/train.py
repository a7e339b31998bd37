"""Stage `train`: fine-tune an ImageNet model on data/prepared, the fast.ai lesson-1 way.

`python -m pipeline.stages.train --member model --data data/prepared --features data/features/model --model
models/model.pt --checkpoint models/model.checkpoint.pt --live dvclive/model` (run by `dvc repro train@model`,
for the member `model`). `train.finetune` picks what trains (`head`, `dense` or `all`); `all` with `head_epochs` is
fastai's `fine_tune`: the head on cached activations, then everything, augmented, at discriminative learning rates,
each phase with AdamW and a one-cycle schedule (`pipeline.training`). The epoch with the lowest validation log loss
is kept. A checkpoint after every epoch (`pipeline.checkpoint`) lets an interrupted run resume on the next `dvc repro`
and end with the same bytes; `models/<member>.pt` holds the weights and all that rebuilds the model, and DVCLive the
learning curves (`dvclive/<member>/`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import (
    atomic_save,
    load_trained_state,
    rng_state,
    run_key,
    same_keys,
    set_rng_state,
    train_arguments,
    trained_state,
)
from pipeline.config import setup_logging
from pipeline.feature_cache import load_cache
from pipeline.files import remove_leftover, temporary_sibling
from pipeline.model import (
    CLASSES,
    pick_device,
    preprocessing,
    set_train_mode,
    use_bf16,
)
from pipeline.params.train import TrainParams, load_member
from pipeline.training import (
    fresh_model,
    make_optimizer,
    phase_setup,
    phases,
    serves_cache,
    train_one_epoch,
    validate,
)

log = logging.getLogger("train")


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
    train_loader, valid_loader, net = phase_setup(
        run.model, finetune, run.data, run.cache, p, run.pre, run.device, run.gen, compiled=p.compile
    )
    if p.compile:
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
        "cached activations" if serves_cache(train_loader) else "images" + (" (augmented)" if p.augment else ""),
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
        loader, _, net = phase_setup(
            model, finetune, run.data, run.cache, p, run.pre, run.device, gen, ("train", "valid"), p.compile
        )
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
    args = train_arguments(argv)
    setup_logging()
    p = load_member(args.member, args.params)
    if not (args.data / "manifest.csv").exists():
        raise SystemExit(f"{args.data}/manifest.csv not found: run 'dvc repro prepare' first")
    if args.model.exists():  # as dvc repro does: a model beside a checkpoint means its run was abandoned (make tidy)
        args.model.unlink()
        log.info("removed the previous %s", args.model)
    for tmp in (temporary_sibling(args.model), temporary_sibling(args.checkpoint)):  # a SIGKILL during a save
        if (size := remove_leftover(tmp)) is not None:  # a 174 MB model, a checkpoint up to 1.6 GB: free it first
            log.info("removed %s (%.1f MB), left by an interrupted write", tmp, size / 1e6)
    run = start_run(p, args.data, args.features, args.checkpoint)
    resume(run)
    args.model.parent.mkdir(parents=True, exist_ok=True)
    from dvclive import Live  # here, not at the top: imported only when the stage runs

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
