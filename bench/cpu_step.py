"""Huge pages and frozen layer groups on this CPU: images/s of make offline's forward pass and training step.

`python bench/cpu_step.py` writes bench/results/cpu_step.json (the CPU and its instruction set beside the figures)
and prints a table. Each figure is timed in its own process, since PyTorch reads THP_MEM_ALLOC_ENABLE (transparent
huge pages for allocations over 2 MB; pipeline/__init__.py sets it) once, at its first allocation; the variants run in
turns, round after round, so a noisy machine slows them alike, and the median of the rounds is reported. Measured, at
make offline's size, batch and precision (fp32 here unless the CPU has native bf16, as train.precision auto picks):
the frozen body's forward pass (features, evaluate, validation) and the unfrozen phase's training step with
train.frozen_groups 0 (everything trains) and 3 (the stem and the first two stages stay frozen, make offline's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = [("forward", 0), ("train", 0), ("train", 3)]  # (what, frozen layer groups)


def one(what: str, frozen: int, arch: str, weights: str, size: int, batch: int, steps: int) -> float:
    """Images/s of `steps` timed calls after two warm-up calls, in this process."""
    import torch
    import torch.nn.functional as F

    from pipeline.model import autocast, build_model, param_groups, set_train_mode, use_bf16

    torch.manual_seed(0)
    device = torch.device("cpu")
    bf16 = use_bf16("auto", device)
    model = build_model(arch, weights).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    if what == "forward":
        model.eval()

        @torch.no_grad()
        def step() -> None:
            with autocast(device, bf16):
                model(x).float().sum().item()

    else:
        set_train_mode(model, "all", True, frozen)
        optimizer = torch.optim.AdamW(param_groups(model, "all", 3e-4, 0.1, frozen))

        def step() -> None:
            with autocast(device, bf16):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet (make offline's) or none")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="train.batch_size; the forward pass takes twice")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each variant in each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_step.json")
    parser.add_argument("--one", nargs=2, metavar=("WHAT", "FROZEN"), help=argparse.SUPPRESS)  # a child's variant
    args = parser.parse_args(argv)
    if args.one:
        what, frozen = args.one[0], int(args.one[1])
        batch = 2 * args.batch_size if what == "forward" else args.batch_size  # features.batch_size is 64
        print(json.dumps(one(what, frozen, args.arch, args.weights, args.image_size, batch, args.steps)))
        return
    from offline_real import cpu

    from pipeline.model import cpu_flags

    figures: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for thp in ("0", "1"):
            for what, frozen in VARIANTS:
                cmd = [sys.executable, __file__, "--one", what, str(frozen), "--arch", args.arch]
                cmd += ["--weights", args.weights, "--image-size", str(args.image_size)]
                cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
                env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                key = f"{what}, frozen_groups {frozen}, THP {thp}" if what == "train" else f"forward, THP {thp}"
                figures.setdefault(key, []).append(float(done.stdout.strip().splitlines()[-1]))
    median = {k: statistics.median(v) for k, v in figures.items()}
    base = median["train, frozen_groups 0, THP 0"]
    results = {
        "cpu": {**cpu(), "flags": list(cpu_flags())},
        "arch": args.arch,
        "weights": args.weights,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "img_s": median,
        "rounds": figures,
        "ratios": {
            "forward: THP 1 / 0": median["forward, THP 1"] / median["forward, THP 0"],
            "train all: THP 1 / 0": median["train, frozen_groups 0, THP 1"] / base,
            "train: frozen_groups 3 / 0 (THP 0)": median["train, frozen_groups 3, THP 0"] / base,
            "train: frozen_groups 3, THP 1 / frozen_groups 0, THP 0": median["train, frozen_groups 3, THP 1"] / base,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for k, v in median.items():
        print(f"{k:36s} {v:6.1f} img/s")
    for k, v in results["ratios"].items():
        print(f"{k:56s} {v:5.2f}x")


if __name__ == "__main__":
    main()
