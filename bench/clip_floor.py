"""A floor on the probability clip, chosen on validation: does clipping at least this much survive confident mistakes?

`python bench/clip_floor.py --project DIR` (a project where `make offline` has run: its validation logits,
predictions/valid/<member>.csv, made with the TTA predict applies). For each floor F, the calibration evaluate fits
(a temperature, then the clip searched on top of it) is fitted on four folds of the validation set with the clip
raised to at least F, and scored on the fifth; a floor only helps if the validation split misses confident mistakes
the held-out fold has. Writes bench/results/clip_floor.json and prints the table; the test set is not touched unless
`--score-test F --labels CSV` names the floor chosen on validation: then the calibration is fitted on all of
validation and the test logits (predictions/test/<member>.csv) are scored once against the labels (id,label).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.calibration import sigmoid  # noqa: E402
from pipeline.scoring import best_clip, clip_curve, fit_temperature, log_loss, read_predictions  # noqa: E402

FLOORS = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02)


def calibrate(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(temperature, clip) as evaluate fits them on (z, y); a floor raises the clip afterwards."""
    t = fit_temperature(np.stack([np.zeros_like(z), z], 1), y)
    clip, _ = best_clip(clip_curve(sigmoid(z / t), y, 0.2, 0.0005))
    return t, clip


def out_of_fold(z: np.ndarray, y: np.ndarray, floors, folds: int = 5, seed: int = 0) -> dict[float, float]:
    """{floor: log loss of P(dog) with the calibration fitted on the other folds, its clip at least the floor}."""
    order = np.random.default_rng(seed).permutation(len(y))
    held_out = [order[k::folds] for k in range(folds)]
    fitted = [calibrate(z[np.setdiff1d(order, held)], y[np.setdiff1d(order, held)]) for held in held_out]
    losses = {}
    for floor in floors:
        p = np.empty(len(y))
        for held, (t, clip) in zip(held_out, fitted, strict=True):
            p[held] = np.clip(sigmoid(z[held] / t), max(clip, floor), 1 - max(clip, floor))
        losses[floor] = log_loss(y, p)
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project folder after make offline")
    parser.add_argument("--member", default="model")
    parser.add_argument("--score-test", type=float, help="the floor chosen on validation: score the test set once")
    parser.add_argument("--labels", type=Path, help="the test labels (id,label) for --score-test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clip_floor.json")
    args = parser.parse_args(argv)
    if args.score_test is not None and not args.labels:
        parser.error("--score-test needs --labels")
    _, y, z = read_predictions(args.project / "predictions" / "valid" / f"{args.member}.csv")
    record = {"project": str(args.project), "n": int(len(y)), "floors": {}}
    t, clip = calibrate(z, y)
    for floor, loss in out_of_fold(z, y, FLOORS).items():
        record["floors"][str(floor)] = {"log_loss_calibrated_out_of_fold": loss, "clip_on_all": max(clip, floor)}
        print(f"floor {floor:<7g} calibrated log loss (out of fold) {loss:.4f}")
    if args.score_test is not None:
        clip = max(clip, args.score_test)
        test = pd.read_csv(args.project / "predictions" / "test" / f"{args.member}.csv")
        truth = pd.read_csv(args.labels).merge(test, on="id")
        p = np.clip(sigmoid(truth["logit"].to_numpy() / t), clip, 1 - clip)
        yt = truth["label"].to_numpy()
        record["test"] = {"floor": args.score_test, "n": len(yt), "temperature": t, "clip": clip,
                          "accuracy": float(np.mean((p > 0.5) == yt)), "log_loss": log_loss(yt, p)}  # fmt: skip
        print(f"test, floor {args.score_test:g}: {record['test']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
