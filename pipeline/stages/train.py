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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import (
    atomic_save,
    load_trained_state,
    remove_leftovers,
    rng_state,
    run_key,
    same_keys,
    set_rng_state,
    train_arguments,
    trained_state,
)
from pipeline.config import setup_logging
from pipeline.distributed import (
    Ranks,
    all_gathered,
    barrier,
    check_same_weights,
    finish,
    launch,
    mean_over_ranks,
    rank_device,
    start,
    under_torchrun,
)
from pipeline.feature_cache import load_cache
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
    train_steps,
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
    ranks: Ranks  # this process among torchrun's (ONE outside torchrun)
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
    ranks = start(device)
    device = rank_device(device, ranks)
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
        model=fresh_model(p, device, ranks),  # seeds torch first: the same random weights as features built
        pre=preprocessing(p.arch, p.image_size),
        cache=load_cache(features, p, data),
        gen=torch.Generator().manual_seed(p.seed),
        plan=phases(p),
        key=run_key(p, data),
        bf16=use_bf16(p.precision, device),
        ranks=ranks,
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
    if live is None:  # not rank 0
        return
    for name, value in metrics.items():
        live.log_metric(name, value)
    live.next_step()


def train_phases(
    run: Run, model: nn.Module, gen: torch.Generator, live=None, fit_on=("train",), stop: int | None = None
) -> None:
    """fastai's fine_tune as one loop over the plan: each phase's loaders, module and one-cycle schedule
    (`phase_setup`, `make_optimizer`), then its epochs. The validated run (`stop` None) continues where the checkpoint
    left and validates, keeps the best epoch and checkpoints after every epoch; the refit trains `model` on `fit_on`
    up to the epoch `stop`, on the same schedules, so each epoch trains at the learning rates the kept one did."""
    p, validated = run.p, stop is None
    first = 0  # the phase's first epoch, counted over all phases
    for phase, (finetune, epochs, lr) in enumerate(run.plan):
        begin = max(run.epochs_done, first) if validated else first
        end = first + epochs if validated else min(first + epochs, stop)
        if begin < end:
            train_loader, valid_loader, net = phase_setup(
                model, finetune, run.data, run.cache, p, run.pre, run.device, gen, fit_on, p.compile, run.ranks
            )
            optimizer, scheduler = make_optimizer(model, p, finetune, lr, epochs * len(train_loader))
            if validated:
                restore(run, phase, first, optimizer, scheduler)
                describe_phase(run, finetune, train_loader, valid_loader, net)
            for epoch in range(begin, end):
                t0 = time.perf_counter()
                set_train_mode(model, finetune, p.freeze_bn, p.frozen_groups)
                desc = f"{finetune} epoch {epoch + 1}" if validated else f"refit {finetune} epoch {epoch + 1}"
                left = end - epoch if validated and epoch == begin else 0  # the phase's first epoch here: its ETA
                loss = train_steps(net, train_loader, optimizer, scheduler, run.device, desc, run.bf16, left)
                loss = mean_over_ranks(loss, run.ranks)
                if validated:
                    end_epoch(run, live, (phase, finetune, epoch), loss, net, valid_loader, optimizer, scheduler, t0)
                else:
                    log.info("refit epoch %d/%d on %d images (%s)  train_loss %.4f  %.0fs", epoch + 1, stop,
                             len(train_loader.dataset), finetune, loss, time.perf_counter() - t0)  # fmt: skip
            check_same_weights(model, run.ranks)
        first += epochs


def restore(run: Run, phase: int, first: int, optimizer, scheduler) -> None:
    """Where the run resumed: the optimizer and schedule in the phase it stopped in, and the RNG states, once."""
    ckpt = run.resumed
    if ckpt is None:
        return
    if ckpt["phase"] == phase and run.epochs_done > first:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt["rng"]  # under torchrun, each rank's
    set_rng_state(rng[run.ranks.rank] if isinstance(rng, list) else rng, run.gen)
    run.resumed = None


def describe_phase(run: Run, finetune: str, train_loader, valid_loader, net) -> None:
    p = run.p
    if p.compile:
        log.info("torch.compile: on (%s)", type(net).__name__)
    log.info(
        "%s: %d trainable parameters on %s; %d train / %d valid images%s",
        finetune,
        sum(q.numel() for q in run.model.parameters() if q.requires_grad),
        "cached activations" if serves_cache(train_loader) else "images" + (" (augmented)" if p.augment else ""),
        len(train_loader.dataset),
        len(valid_loader.dataset) * run.ranks.world,  # each rank validates its shard
        f"; {run.ranks.world} processes, each on 1/{run.ranks.world} of every batch" if run.ranks.joined else "",
    )


def end_epoch(run: Run, live, at: tuple[int, str, int], train_loss: float, net, valid_loader, optimizer, scheduler,
              t0: float) -> None:  # fmt: skip
    """Validate, keep the best epoch, and checkpoint everything needed to continue exactly here (rank 0 writes);
    `at`: (phase, finetune, epoch)."""
    p, (phase, finetune, epoch) = run.p, at
    metrics = {"train_loss": train_loss, **validate(net, valid_loader, run.device, run.bf16, run.ranks)}
    run.history.append(metrics)
    log_epoch(live, metrics)
    if run.best is None or p.keep == "last" or metrics["valid_log_loss"] < run.best["valid_log_loss"]:
        run.best = {"epoch": epoch + 1, "valid_log_loss": metrics["valid_log_loss"], "finetune": finetune}
        run.best["state"] = trained_state(run.model, finetune)
    rng = all_gathered(rng_state(run.gen), run.ranks)  # each rank's: a resumed rank continues its own draws
    if run.ranks.main:
        checkpoint = {
            "run_key": run.key,
            "epoch": epoch + 1,
            "phase": phase,
            "finetune": finetune,
            "model": trained_state(run.model, finetune),
            "optimizer": optimizer.state_dict(),  # the same on every rank: DDP averaged the gradients
            "scheduler": scheduler.state_dict(),
            "rng": rng if run.ranks.joined else rng[0],
            "history": run.history,
            "best": run.best,
        }
        atomic_save(checkpoint, run.checkpoint)
    barrier(run.ranks)
    log.info(
        "epoch %d/%d  train_loss %.4f  valid_acc %.4f  valid_log_loss %.4f  %.0fs",
        epoch + 1, run.total, train_loss, metrics["valid_accuracy"], metrics["valid_log_loss"],
        time.perf_counter() - t0,
    )  # fmt: skip


def refit(run: Run) -> nn.Module:
    """Train again from the start on train + valid, the same plan and schedules stopped at the kept epoch: the model
    submitted and served has seen 20% more images. Nothing is left to validate it on, so the kept epoch's model
    gives the validation figures and the calibration. Not checkpointed: a killed refit starts over."""
    model, gen = fresh_model(run.p, run.device, run.ranks), torch.Generator().manual_seed(run.p.seed)
    train_phases(run, model, gen, fit_on=("train", "valid"), stop=run.best["epoch"])
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
    if (p.nproc > 1 or p.nnodes > 1) and not under_torchrun():  # this stage again, in train.nproc processes
        argv = sys.argv[1:] if argv is None else argv
        launch(__spec__.name, argv, p.nproc, p.nnodes, p.rdzv_endpoint, f"train-{args.member or 'train'}")
        return
    run = start_run(p, args.data, args.features, args.checkpoint)
    if run.ranks.main:
        remove_leftovers(args.model, args.checkpoint)
    resume(run)
    args.model.parent.mkdir(parents=True, exist_ok=True)
    from dvclive import Live  # here, not at the top: imported only when the stage runs

    live = Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None) if run.ranks.main else nullcontext()
    with live as live:
        if live is not None:  # DVC removed the curves of the resumed epochs: rebuild them from the checkpoint
            for metrics in run.history:
                log_epoch(live, metrics)
        train_phases(run, run.model, run.gen, live)
        if live is not None:
            log_curves(live, run.history)
    kept = kept_model(run)
    refitted = refit(run) if p.refit else None
    if run.ranks.main:
        save_model(run, kept, refitted, args.model)
        args.checkpoint.unlink(missing_ok=True)  # finished: the next run with other params starts fresh
        log.info("wrote %s", args.model)
    finish(run.ranks)


if __name__ == "__main__":
    main()
