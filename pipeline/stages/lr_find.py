"""Stage `lr_find`: the 2019 lesson's learning-rate finder, on the cached activations (or the images).

`python -m pipeline.stages.lr_find --member model --data data/prepared --features data/features/model --out
plots/model/lr_find --metrics metrics/lr_find/model.json` (run by `dvc repro lr_find@model`, for the member
`model`; `dvc plots show` draws loss vs lr).

Leslie Smith's range test as fastai's `lr_find` runs it: from the model `train` starts from, one mini-batch
per step with the learning rate growing exponentially from `start_lr` to `end_lr` over `steps` steps (AdamW,
the train params' weight decay), recording the smoothed loss, until the loss passes 4x its minimum. The
suggestion is fastai's "valley": the middle of the longest stretch where the loss falls, a value that
sits well below the blow-up. What it sweeps is what `train` trains first: the head on the cached
activations (the head epochs of `fine_tune`, or `finetune: head`), else `finetune`'s layers on images.
The model is thrown away: the sweep changes nothing that train uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params, setup_logging
from pipeline.feature_cache import load_cache
from pipeline.files import atomic_write_text
from pipeline.model import param_groups, pick_device, preprocessing, set_train_mode
from pipeline.params.train import LrFindParams, load_member
from pipeline.training import fresh_model, phase_setup, phases, serves_cache, train_steps

log = logging.getLogger("lr_find")


def sweep(net, loader, optimizer, device, start_lr: float, end_lr: float, steps: int, beta: float = 0.98):
    """[(lr, smoothed loss)] over up to `steps` mini-batches of training's loop (`train_steps`), each group's lr
    growing exponentially from `start_lr` times its factor; stops when the loss passes 4x its minimum."""
    gamma = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: start_lr * gamma**step)  # x group's lr
    curve, avg, lowest = [], 0.0, float("inf")

    def record(step: int, loss: float) -> bool:
        nonlocal avg, lowest
        avg = beta * avg + (1 - beta) * loss
        smoothed = avg / (1 - beta ** (step + 1))  # bias-corrected, as fastai's
        curve.append((start_lr * gamma**step, smoothed))
        lowest = min(lowest, smoothed)
        return not np.isfinite(smoothed) or smoothed > 4 * lowest

    train_steps(net, batches(loader, steps), optimizer, scheduler, device, "lr_find", after_step=record, total=steps)
    return curve


def batches(loader, steps: int):
    """`steps` batches of `loader`, going round again when it has fewer."""
    step = 0
    while True:
        for batch in loader:
            if step == steps:
                return
            yield batch
            step += 1


def valley(curve: list[tuple[float, float]]) -> float:
    """fastai's `valley`: the longest run of falling loss (longest decreasing subsequence), half way down it."""
    losses = np.array([loss for _, loss in curve])
    n = len(losses)
    if n < 3:
        raise SystemExit(f"the sweep stopped after {n} steps: lower lr_find.start_lr")
    length, prev = np.ones(n, dtype=int), np.full(n, -1)
    for i in range(1, n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i], prev[i] = length[j] + 1, j
    end = int(np.argmax(length))
    start = end
    while prev[start] != -1:
        start = prev[start]
    sections = (end - start) / 3
    return float(curve[start + int(sections) + int(sections / 2)][0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Sweep the learning rate (the lesson's lr_find).")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared")
    parser.add_argument("--features", type=Path, required=True, help="data/features/<member> (stage features)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the plot file")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--member", help="params.yaml members.<name>: its overrides of train (none: train alone)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    p = load_member(args.member, args.params)
    lp = load_params(LrFindParams, "lr_find", args.params)
    device = pick_device(p.device)
    model = fresh_model(p, device)
    cache = load_cache(args.features, p, args.data)
    finetune = phases(p)[0][0]  # what train trains first (fine_tune: the head, on the cache)
    gen = torch.Generator().manual_seed(p.seed)
    pre = preprocessing(p.arch, p.image_size)
    train_loader, _, net = phase_setup(model, finetune, args.data, cache, p, pre, device, gen)
    set_train_mode(model, finetune, p.freeze_bn, p.frozen_groups)
    groups = param_groups(model, finetune, 1.0, p.body_lr_factor, p.frozen_groups)  # lr 1: each group's factor
    optimizer = torch.optim.AdamW(groups, lr=lp.start_lr, weight_decay=p.weight_decay)
    curve = sweep(net, train_loader, optimizer, device, lp.start_lr, lp.end_lr, lp.steps)
    suggestion = valley(curve)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lr_find.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(
            [("lr", "loss"), *((f"{lr:.3e}", f"{loss:.5f}") for lr, loss in curve)]
        )
    current = p.head_lr if finetune == "head" and p.finetune == "all" else p.lr
    key = "train.head_lr" if finetune == "head" and p.finetune == "all" else "train.lr"
    result = {"finetune": finetune, "on": "cached activations" if serves_cache(train_loader) else "images",
              "steps": len(curve), "suggested_lr": suggestion, "current_lr": current, "key": key}  # fmt: skip
    atomic_write_text(args.metrics, json.dumps(result, indent=2) + "\n")
    log.info(
        "%s on %s: %d steps from %g; the valley suggests %s=%.2g (now %g)",
        finetune,
        result["on"],
        len(curve),
        lp.start_lr,
        key,
        suggestion,
        current,
    )


if __name__ == "__main__":
    main()
