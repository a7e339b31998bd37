"""Test-time augmentation beyond the flip, chosen on validation: which views of a photo to average.

`python bench/tta_check.py --project DIR` (a project where `make offline` has run: its fp32 ONNX model and
data/prepared/valid). Each validation photo goes through the exported model in several views: the weights' own
preprocessing (short side to resize_size, centre crop) and its mirror, as predict's flip TTA; the short side to the
crop size (the whole photo's centre, less cut away) and its mirror; a closer crop (short side to 1.15 x resize_size)
and its mirror. For each set of views, the mean logit is calibrated as evaluate does (temperature, then clip) in
5 folds of the validation set: fitted on four, scored on the fifth, so a set with more views gains nothing from the
fit. Writes bench/results/tta_check.json and prints the table; the test set is not touched, unless `--score-test SET
--labels CSV` names the set chosen on validation: then its calibration is fitted on all of validation and the test
photos (data/prepared/test) are scored once against the labels (id,label; 1 = dog).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.calibration import logit_difference, sigmoid  # noqa: E402
from pipeline.contract import ModelContract  # noqa: E402
from pipeline.data import load_image, open_model  # noqa: E402
from pipeline.scoring import best_clip, clip_curve, fit_temperature, log_loss  # noqa: E402

SETS = {  # name -> views averaged
    "none": ["centre"],
    "flip (predict.tta)": ["centre", "centre flip"],
    "flip + whole": ["centre", "centre flip", "whole", "whole flip"],
    "flip + close": ["centre", "centre flip", "close", "close flip"],
    "flip + whole + close": ["centre", "centre flip", "whole", "whole flip", "close", "close flip"],
}


def view(img, contract: ModelContract, name: str) -> np.ndarray:
    size, resize = contract.image_size, contract.resize_size
    short = {"centre": resize, "whole": size, "close": round(1.15 * resize)}[name.split()[0]]
    x = contract.preprocess(img, short)
    return np.ascontiguousarray(x[..., ::-1]) if name.endswith("flip") else x


def view_logits(onnx_dir: Path, paths: list[Path], names: list[str], batch: int = 32) -> dict[str, np.ndarray]:
    """z_dog - z_cat of every photo in every view, on the fp32 model."""
    session, _, _ = open_model(onnx_dir, "cpu", "fp32")
    contract = ModelContract.read(onnx_dir)
    out = {n: [] for n in names}
    with ThreadPoolExecutor(2) as pool:
        draft = round(1.15 * contract.resize_size)  # the closest view's size: no view is upscaled from a draft
        for i in range(0, len(paths), batch):
            imgs = list(pool.map(lambda p: load_image(p, 25_000_000, draft), paths[i : i + batch]))
            for n in names:
                x = np.stack([view(img, contract, n) for img in imgs])
                out[n].append(logit_difference(contract.probs(session, x), contract.dog))
            print(f"\r{i + len(imgs)}/{len(paths)} photos", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {n: np.concatenate(v) for n, v in out.items()}


def calibrated_out_of_fold(z: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[float, np.ndarray]:
    """Log loss of P(dog) with temperature and clip fitted on the other folds
    (pipeline.scoring's search, as evaluate runs it), and those P."""
    order = np.random.default_rng(seed).permutation(len(y))
    p = np.empty(len(y))
    for k in range(folds):
        held = order[k::folds]
        fit = np.setdiff1d(order, held)
        two = np.stack([np.zeros_like(z), z], 1)
        t = fit_temperature(two[fit], y[fit])
        p_fit = sigmoid(z[fit] / t)
        clip, _ = best_clip(clip_curve(p_fit, y[fit], 0.2, 0.0005))
        p[held] = np.clip(sigmoid(z[held] / t), clip, 1 - clip)
    return log_loss(y, p), p


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project folder after make offline")
    parser.add_argument("--member", default="model")
    parser.add_argument("--limit", type=int, default=0, help="at most this many validation photos (0: all)")
    parser.add_argument("--score-test", choices=list(SETS), help="the set chosen on validation: score the test set")
    parser.add_argument("--labels", type=Path, help="the test labels (id,label) for --score-test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tta_check.json")
    args = parser.parse_args(argv)
    if args.score_test and not args.labels:
        parser.error("--score-test needs --labels")
    valid = args.project / "data" / "prepared" / "valid"
    paths = sorted((valid / "cats").glob("*")) + sorted((valid / "dogs").glob("*"))
    y = np.array([0 if p.parent.name == "cats" else 1 for p in paths])
    if args.limit:
        keep = np.random.default_rng(0).permutation(len(paths))[: args.limit]
        paths, y = [paths[i] for i in sorted(keep)], y[sorted(keep)]
    names = sorted({n for views in SETS.values() for n in views})
    z = view_logits(args.project / "models" / "onnx" / args.member, paths, names)
    results = {}
    for name, views in SETS.items():
        mean = np.mean([z[v] for v in views], 0)
        calibrated, p = calibrated_out_of_fold(mean, y)
        worst = np.sort(-np.log(np.where(y == 1, p, 1 - p)))[::-1]
        results[name] = {
            "views": views,
            "accuracy": float(np.mean((mean > 0) == y)),
            "log_loss": log_loss(y, sigmoid(mean)),
            "log_loss_calibrated_out_of_fold": calibrated,
            "share_of_loss_in_worst_5": float(worst[:5].sum() / worst.sum()),
        }
        print(f"{name:24s} accuracy {results[name]['accuracy']:.4f}  log loss {results[name]['log_loss']:.4f}  "
              f"calibrated (out of fold) {calibrated:.4f}")  # fmt: skip
    record = {"project": str(args.project), "n": int(len(y)), "sets": results}
    if args.score_test:
        record["test"] = score_test(args, z, y)
        print(f"test, {args.score_test}: {record['test']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


def score_test(args, z: dict[str, np.ndarray], y: np.ndarray) -> dict:
    """The chosen set on the test photos, calibrated (temperature, then clip) on all of validation."""
    views = SETS[args.score_test]
    mean = np.mean([z[v] for v in views], 0)
    t = fit_temperature(np.stack([np.zeros_like(mean), mean], 1), y)
    clip, _ = best_clip(clip_curve(sigmoid(mean / t), y, 0.2, 0.0005))
    labels = dict(np.loadtxt(args.labels, delimiter=",", skiprows=1, dtype=int))
    test = args.project / "data" / "prepared" / "test" / "unknown"
    paths = sorted(test.glob("*.jpg"), key=lambda p: int(p.stem))
    zt = view_logits(args.project / "models" / "onnx" / args.member, paths, views)
    p = np.clip(sigmoid(np.mean([zt[v] for v in views], 0) / t), clip, 1 - clip)
    yt = np.array([labels[int(p.stem)] for p in paths])
    return {"set": args.score_test, "n": len(yt), "temperature": t, "clip": clip,
            "accuracy": float(np.mean((p > 0.5) == yt)), "log_loss": log_loss(yt, p)}  # fmt: skip


if __name__ == "__main__":
    main()
