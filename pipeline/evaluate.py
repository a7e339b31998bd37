"""Stage `evaluate`: how good is a member's model on the validation set, and the best probability clip.

`python -m pipeline.evaluate --data data/prepared --model models/model.pt --metrics
metrics/members/model/evaluate.json --plots plots/model/evaluate --predictions predictions/valid/model.csv`
(run by `dvc repro evaluate@model`, for the member `model`; `--predictions` holds each image's logit for `blend`).

Writes accuracy, log loss and the confusion matrix; the lesson's diagnostics as image grids (the most
wrong images, "top losses", and the most uncertain ones); and the clip. Kaggle's log loss punishes a
confident mistake without bound, so submissions clip P(dog) to [c, 1-c]. The lesson fixes c = 0.05;
here c is searched on the validation set over a fine grid, and both are reported; a search that ends
at `clip_max` is flagged (the curve was still falling: raise clip_max). Optionally a temperature is fitted
on validation too (then a clip searched on top of it); `calibration` says which of the two `predict`
applies: the temperature when it beats the clip alone on validation, else the clip. The validation
predictions are made as `predict` makes the test set's: the model's own preprocessing and, with `predict.tta`,
the mean of the image's and its mirror's logits, so what is fitted here is what the submission gets.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.optimize import minimize_scalar
from sklearn.metrics import confusion_matrix
from sklearn.metrics import log_loss as sk_log_loss
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pipeline.config import load_params, load_value, setup_logging
from pipeline.files import atomic_write_text
from pipeline.model import eval_transform, load_model, pick_device, predict_logits
from pipeline.params.evaluate import EvaluateParams

log = logging.getLogger("evaluate")


def log_loss(y: np.ndarray, p_dog: np.ndarray) -> float:
    """Kaggle's metric: binary cross-entropy of P(dog) for labels y (1 = dog), in scikit-learn's argument order
    (it is scikit-learn's, which clips at float eps)."""
    return float(sk_log_loss(y, p_dog, labels=[0, 1]))


def clip_curve(p_dog: np.ndarray, y: np.ndarray, clip_max: float, step: float) -> list[tuple[float, float]]:
    """(c, log loss of clip(p, c, 1-c)) for c = 0, step, ..., clip_max."""
    clips = np.round(np.arange(0.0, clip_max + step / 2, step), 10)
    return [(float(c), log_loss(y, np.clip(p_dog, c, 1 - c))) for c in clips]


def best_clip(curve: list[tuple[float, float]]) -> tuple[float, float]:
    """The clip with the lowest log loss (the smallest such clip on ties)."""
    return min(curve, key=lambda cl: (cl[1], cl[0]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T minimising the log loss of softmax(logits / T) (Guo et al. 2017, temperature scaling)."""

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(-np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))))

    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def image_grid(paths: list[str], captions: list[str], tile: int = 160) -> Image.Image:
    """Thumbnails with a caption line under each, 4 to a row."""
    cols = 4
    rows = max(1, (len(paths) + cols - 1) // cols)
    grid = Image.new("RGB", (cols * tile, rows * (tile + 28)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (path, caption) in enumerate(zip(paths, captions, strict=True)):
        with Image.open(path) as img:
            thumb = img.convert("RGB")
            thumb.thumbnail((tile, tile))
        x, y = (i % cols) * tile, (i // cols) * (tile + 28)
        grid.paste(thumb, (x + (tile - thumb.width) // 2, y))
        for j, line in enumerate(caption.split("\n")):
            draw.text((x + 4, y + tile + 2 + j * 12), line, fill="black")
    return grid


def evaluate(probs: np.ndarray, logits: np.ndarray, y: np.ndarray, p: EvaluateParams) -> tuple[dict, list]:
    """The metrics, and the clip curve."""
    p_dog = probs[:, 1]
    curve = clip_curve(p_dog, y, p.clip_max, p.clip_step)
    clip, clipped = best_clip(curve)
    lesson = log_loss(y, np.clip(p_dog, p.lesson_clip, 1 - p.lesson_clip))
    metrics = {
        "n": int(len(y)),
        "accuracy": float(np.mean(probs.argmax(1) == y)),
        "log_loss": log_loss(y, p_dog),
        "clip": clip,
        "log_loss_clipped": clipped,
        "lesson_clip": p.lesson_clip,
        "log_loss_lesson_clip": lesson,
        "confusion_matrix": confusion_matrix(y, probs.argmax(1), labels=[0, 1]).tolist(),  # rows: true cat, dog
    }
    metrics["clip_at_max"] = bool(clip >= p.clip_max - p.clip_step / 2)
    metrics["calibration"] = "clip"
    if p.temperature_scaling:
        t = fit_temperature(logits, y)
        scaled = softmax(logits / t)[:, 1]
        t_clip, t_clipped = best_clip(clip_curve(scaled, y, p.clip_max, p.clip_step))
        metrics.update(
            temperature=t,
            log_loss_temperature=log_loss(y, scaled),
            temperature_clip=t_clip,  # the clip searched on the temperature-scaled probabilities
            log_loss_temperature_clipped=t_clipped,
            temperature_beats_clip=t_clipped < clipped,
        )
        if t_clipped < clipped:
            metrics["calibration"] = "temperature"
    return metrics, curve


def write_predictions(path: Path, paths: list[str], labels: np.ndarray, z: np.ndarray) -> None:
    """`path,label,logit` per validation image (label 1 = dog; logit = z_dog - z_cat, as predict computes it,
    written exactly): what `blend` combines across members."""
    rows = [(name, int(t), repr(float(v))) for name, t, v in zip(paths, labels, z, strict=True)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("path", "label", "logit"), *rows])
    atomic_write_text(path, buf.getvalue())


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, labels, logits) as `write_predictions` wrote them."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"path", "label", "logit"}:
        raise ValueError(f"{path}: expected the columns path,label,logit and at least one row")
    labels = np.array([int(r["label"]) for r in rows])
    return [r["path"] for r in rows], labels, np.array([float(r["logit"]) for r in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate the model on the validation set.")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for the plot files")
    parser.add_argument("--predictions", type=Path, help="CSV of each validation image's logit, for the blend")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    p = load_params(EvaluateParams, "evaluate", args.params)
    device = pick_device("auto")
    try:
        model, meta = load_model(args.model, device, validated=True)  # after a refit, the model chosen on valid
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    tta = load_value("predict", "tta", bool, args.params)  # fit the calibration on what predict makes
    ds = ImageFolder(args.data / "valid", transform=eval_transform(meta))
    loader = DataLoader(ds, batch_size=p.batch_size, num_workers=p.workers)
    logits, y = predict_logits(model, loader, device, tta=tta)
    probs = softmax(logits)
    metrics, curve = evaluate(probs, logits, y, p)
    metrics["tta"] = tta
    metrics["refit"] = bool(meta.get("refit"))  # the submitted model: these weights retrained on train + valid

    # plots: per-image predictions (DVC's confusion plot), the clip curve, and the lesson's image grids
    names = [meta["classes"][i].rstrip("s") for i in range(len(meta["classes"]))]
    paths = [path for path, _ in ds.samples]
    rows = [
        (os.path.relpath(path, args.data), names[t], names[int(pr.argmax())], f"{pr[1]:.6f}")
        for path, t, pr in zip(paths, y, probs, strict=True)
    ]
    args.plots.mkdir(parents=True, exist_ok=True)
    with open(args.plots / "valid_predictions.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("path", "actual", "predicted", "p_dog"), *rows])
    with open(args.plots / "clip_curve.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("clip", "log_loss"), *curve])
    losses = -np.log(np.maximum(probs[np.arange(len(y)), y], 1e-15))
    for name, order in (("top_losses", np.argsort(-losses)), ("most_uncertain", np.argsort(np.abs(probs[:, 1] - 0.5)))):
        pick = order[: p.show_images]
        captions = [f"{Path(paths[i]).name}\nis {names[y[i]]}, P(dog)={probs[i, 1]:.3f}" for i in pick]
        image_grid([paths[i] for i in pick], captions).save(args.plots / f"{name}.png")
    if args.predictions is not None:
        dog = meta["classes"].index("dogs")
        z = logits[:, dog] - logits[:, 1 - dog]
        labels = (y == dog).astype(int)
        write_predictions(args.predictions, [os.path.relpath(path, args.data) for path in paths], labels, z)
    atomic_write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    if metrics["clip_at_max"]:
        log.warning(
            "the best clip is evaluate.clip_max (%g): the log loss was still falling there, so a larger clip may "
            "do better; raise clip_max (the model is far from calibrated)",
            p.clip_max,
        )
    log.info(
        "accuracy %.4f  log_loss %.4f  clip %.4f -> %.4f  (lesson clip %.2f -> %.4f)%s",
        metrics["accuracy"],
        metrics["log_loss"],
        metrics["clip"],
        metrics["log_loss_clipped"],
        p.lesson_clip,
        metrics["log_loss_lesson_clip"],
        f"  temperature {metrics['temperature']:.3f} (+ clip {metrics['temperature_clip']:.4f}) -> "
        f"{metrics['log_loss_temperature_clipped']:.4f}"
        if p.temperature_scaling
        else "",
    )
    log.info("predict will calibrate with the %s (the better on validation)", metrics["calibration"])


if __name__ == "__main__":
    main()
