"""bf16 autocast and channels_last on this CPU: images/s of make offline's training step and feature extraction.

`python bench/precision.py` writes bench/results/precision_cpu.json and prints each figure: a training step of
the whole network (make offline's unfrozen phase: finetune all, BatchNorm frozen, AdamW) and the frozen body's
forward pass (the features stage), each in fp32 and under bf16 autocast, with channels_last and without. The
variants run in turns, round after round, so a noisy machine slows them alike; the ratios are the figures to read.
On CPUs without native bf16 (AVX2 only, or AVX-512 without AVX512_BF16/AMX) bf16 is emulated: expect it slower.

`--quality ZIP` also runs the pipeline's own prepare, features, train and evaluate stages on that competition zip
(the 4k kit: `../shared/data/real-kaggle-4k/...zip`) with train.precision fp32 and then bf16, fastai's head phase
alone (8 epochs on the cached activations, make offline's head recipe), and records each one's calibrated
validation log loss and its features stage's time: what bf16 features do to quality, chosen on validation.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.model import build_model, cpu_flags, frozen_part, param_groups, set_train_mode  # noqa: E402


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"model name\s*:\s*(.*)", info)
    return found[1] if found else platform.processor() or platform.machine()


def train_step(model, opt, x, y, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@torch.no_grad()
def features_step(trunk, x, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        trunk(x).float().sum().item()


HEAD_RECIPE = dict(  # make offline's model and head phase, alone: the frozen body's features decide it
    arch="efficientnet_lite0",
    weights="imagenet",
    image_size=0,
    finetune="head",
    augment=False,
    epochs=8,
    lr=0.002,
    workers=0,
    feature_cache=True,
)


def quality(zip_path: Path) -> dict:
    """{precision: features seconds, calibrated validation figures} of the head recipe on `zip_path`'s validation."""
    import subprocess
    import tempfile

    import yaml

    if not zip_path.is_file():
        raise SystemExit(f"{zip_path} not found: pass --quality the competition zip (the shared real-kaggle-4k one)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        py = [sys.executable, "-m"]
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["prepare"]["valid_per_class"] = 250
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        data = ["--data", str(tmp / "prepared")]
        prepare = ["--zip", str(zip_path), "--out", data[1], "--metrics", str(tmp / "prepare.json")]
        subprocess.run(
            [*py, "pipeline.stages.prepare", *prepare, "--params", str(tmp / "params.yaml")], check=True, cwd=ROOT
        )
        for precision in ("fp32", "bf16"):
            params["train"].update(HEAD_RECIPE, precision=precision)
            work = tmp / precision
            work.mkdir()
            (work / "params.yaml").write_text(yaml.safe_dump(params))
            p = ["--params", str(work / "params.yaml")]
            t0 = time.perf_counter()
            subprocess.run(
                [*py, "pipeline.stages.features", *data, "--out", str(work / "features"), *p], check=True, cwd=ROOT
            )
            seconds = time.perf_counter() - t0
            subprocess.run([*py, "pipeline.stages.train", *data, "--features", str(work / "features"),
                            "--model", str(work / "model.pt"), "--checkpoint", str(work / "ckpt.pt"), "--live",
                            str(work / "live"), *p], check=True, cwd=ROOT)  # fmt: skip
            subprocess.run([*py, "pipeline.stages.evaluate", *data, "--model", str(work / "model.pt"),
                            "--metrics", str(work / "evaluate.json"), "--plots", str(work / "plots"), *p], check=True,
                           cwd=ROOT)  # fmt: skip
            chosen = json.loads((work / "evaluate.json").read_text())
            calibrated = chosen["log_loss_temperature_clipped" if chosen["calibration"] == "temperature" else
                                "log_loss_clipped"]  # fmt: skip
            results[precision] = {"features_seconds": round(seconds, 1), "n": chosen["n"],
                                  "accuracy": chosen["accuracy"], "log_loss": chosen["log_loss"],
                                  "log_loss_calibrated": calibrated}  # fmt: skip
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet (make offline's) or none")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each variant, in turns")
    parser.add_argument("--quality", type=Path, help="a competition zip: also compare fp32 and bf16 on its validation")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision_cpu.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 2, (args.batch_size,))
    variants = {f"{p}{'_cl' if cl else ''}": (p == "bf16", cl) for p in ("fp32", "bf16") for cl in (False, True)}
    setups = {}
    for name, (bf16, cl) in variants.items():
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = build_model(args.arch, args.weights).to(memory_format=fmt)
        set_train_mode(model, "all", freeze_bn=True)
        opt = torch.optim.AdamW(param_groups(model, "all", 3e-4, 0.1), lr=3e-4)
        trunk = frozen_part(build_model(args.arch, args.weights).to(memory_format=fmt).eval(), "head")
        xi = x.contiguous(memory_format=fmt)
        setups[name] = (model, opt, trunk, xi, bf16)
        train_step(model, opt, xi, y, bf16)  # warm-up: oneDNN picks its kernels
        features_step(trunk, xi, bf16)
    seconds = {name: {"train": 0.0, "features": 0.0} for name in variants}
    for _ in range(args.rounds):
        for name, (model, opt, trunk, xi, bf16) in setups.items():
            t0 = time.perf_counter()
            train_step(model, opt, xi, y, bf16)
            t1 = time.perf_counter()
            features_step(trunk, xi, bf16)
            seconds[name]["train"] += t1 - t0
            seconds[name]["features"] += time.perf_counter() - t1
    n = args.rounds * args.batch_size
    img_s = {name: {k: n / s for k, s in t.items()} for name, t in seconds.items()}
    base = img_s["fp32_cl"]
    result = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "img_s": img_s,
        "vs_fp32_channels_last": {name: {k: v / base[k] for k, v in f.items()} for name, f in img_s.items()},
    }
    for name, f in img_s.items():
        print(f"{name:8s} train {f['train']:6.1f} img/s  features {f['features']:6.1f} img/s")
    if args.quality is not None:
        result["quality"] = quality(args.quality)
        for precision, q in result["quality"].items():
            print(f"{precision}: features {q['features_seconds']:.0f} s, valid {q['accuracy']:.4f} / "
                  f"{q['log_loss_calibrated']:.4f} calibrated")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
