"""Should `make offline` refit on train + valid? Decided on validation, not on the test set.

`python bench/refit_check.py --project <a project after make offline>` (bench/offline_real.py leaves one).

A refit cannot be judged on the split it trained on, so this nests the choice one level down: a seeded
`--holdout` images per class of the project's training images become an inner validation split, the recipe
(the project's params.yaml, member `model`, with `train.refit: true`) trains on the rest, keeps its best epoch
on the inner split, and refits on both. Then both models, the kept epoch's and the refit, are scored on the
project's own validation split, which neither saw: flip TTA as `predict.tta` says, and the temperature (or
clip) that `evaluate` fits on the inner split with the kept model, as the pipeline applies it. The test labels
are not read. Writes bench/results/refit_check.json with the CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from offline_real import cpu  # noqa: E402
from scipy.special import expit  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from pipeline.calibration import Calibration  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.model import eval_transform, load_model, predict_logits  # noqa: E402
from pipeline.params.evaluate import EvaluateParams  # noqa: E402
from pipeline.scoring import evaluate, log_loss, softmax  # noqa: E402


def nested_split(prepared: Path, out: Path, holdout: int, seed: int) -> dict:
    """out/train and out/valid as links to prepared/train's images: `holdout` per class to valid, seeded."""
    rng, rows, counts = random.Random(seed), [], {}
    for cls in ("cats", "dogs"):
        images = sorted((prepared / "train" / cls).glob("*.jpg"))
        rng.shuffle(images)
        for split, part in (("valid", images[:holdout]), ("train", images[holdout:])):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for image in part:
                (out / split / cls / image.name).symlink_to(image.resolve())
                rows.append((f"{split}/{cls}/{image.name}", image.stem.split(".")[-1], cls.rstrip("s"), split))
            counts[f"{split}/{cls}"] = len(part)
    with open(out / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "id", "label", "split"), *rows])
    return counts


def tta_logits(model_path: Path, data: Path, validated: bool, tta: bool):
    model, meta = load_model(model_path, validated=validated)
    loader = DataLoader(ImageFolder(data, transform=eval_transform(meta)), batch_size=64)
    return predict_logits(model, loader, torch.device("cpu"), tta=tta)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project after make offline")
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the nested run")
    parser.add_argument("--holdout", type=int, default=250, help="inner validation images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "refit_check.json")
    args = parser.parse_args(argv)

    prepared, work = args.project / "data" / "prepared", args.work
    offline = "run 'make offline ZIP=...' there first (bench/offline_real.py leaves such a project)"
    if not (prepared / "train").is_dir():
        raise SystemExit(f"{prepared / 'train'} not found: --project is a project after make offline; {offline}")
    if not (args.project / ".venv" / "bin" / "python").is_file():
        raise SystemExit(f"{args.project / '.venv'} not found: the nested run uses the project's own venv; {offline}")
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty: pass a new or empty folder")
    counts = nested_split(prepared, work / "prepared", args.holdout, args.seed)
    params = yaml.safe_load((args.project / "params.yaml").read_text())
    params["members"] = {"model": {**params["members"].get("model", {}), "refit": True}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    py, p = str(args.project / ".venv" / "bin" / "python"), ["--member", "model", "--params", str(work / "params.yaml")]
    t0 = time.perf_counter()
    for cmd in (
        ["-m", "pipeline.stages.features", "--data", str(work / "prepared"), "--out", str(work / "features"), *p],
        ["-m", "pipeline.stages.train", "--data", str(work / "prepared"), "--features", str(work / "features"),
         "--model", str(work / "model.pt"), "--checkpoint", str(work / "ckpt.pt"), "--live", str(work / "live"), *p],
    ):  # fmt: skip
        subprocess.run([py, *cmd], cwd=args.project, check=True)
    seconds = time.perf_counter() - t0

    tta = bool(params["predict"]["tta"])
    ep = load_params(EvaluateParams, "evaluate", work / "params.yaml")
    inner_logits, inner_y = tta_logits(work / "model.pt", work / "prepared" / "valid", True, tta)
    chosen, _ = evaluate(softmax(inner_logits), inner_logits, inner_y, ep)  # the calibration, on the inner split
    (work / "inner_evaluate.json").write_text(json.dumps(chosen))
    calibration = Calibration.chosen("evaluate", tta, work / "inner_evaluate.json")  # what predict would apply
    temperature, clip = calibration.temperature, calibration.clip
    ckpt = torch.load(work / "model.pt", map_location="cpu", weights_only=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.project, capture_output=True, text=True)
    results = {
        "cpu": cpu(),
        "commit": commit.stdout.strip(),
        "params": ckpt["params"],  # the recipe the check judged
        "split": counts,
        "tta": tta,
        "train_seconds": round(seconds, 1),
        "best_epoch": ckpt["best_epoch"],
        "history": ckpt["history"],  # the inner run's epochs, on the inner validation split
        "inner": chosen,
    }
    for name, validated in (("kept_epoch", True), ("refit", False)):
        z, y = tta_logits(work / "model.pt", prepared / "valid", validated, tta)
        plain, _ = evaluate(softmax(z), z, y, ep)
        p_dog = np.clip(expit((z[:, 1] - z[:, 0]) / (temperature or 1.0)), clip, 1 - clip)  # as predict does
        results[name] = {
            "accuracy": plain["accuracy"],
            "log_loss_uncalibrated": plain["log_loss"],
            "log_loss_calibrated_on_inner": log_loss(y, p_dog),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("split", "kept_epoch", "refit")}, indent=2))


if __name__ == "__main__":
    main()
