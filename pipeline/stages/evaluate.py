"""Stage `evaluate`: how good is a member's model on the validation set, and the best probability clip.

`python -m pipeline.stages.evaluate --data data/prepared --model models/model.pt --metrics
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
the mean logit over the image's views (pipeline/tta.py), so what is fitted here is what the submission gets.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pipeline.config import load_params, load_value, setup_logging
from pipeline.files import atomic_write_text
from pipeline.model import eval_transform, load_model, pick_device, predict_logits
from pipeline.params.evaluate import EvaluateParams
from pipeline.scoring import (
    evaluate,
    softmax,
    write_predictions,
)
from pipeline.tta import Setting, crop_sizes

log = logging.getLogger("evaluate")


class CropsTransform:
    """The crops `predict.tta` averages (pipeline/tta.py), each as the weights' own `eval_transform`: (K, 3, H, W).
    A class, not a closure: DataLoader workers may pickle it."""

    def __init__(self, pre: dict, tta) -> None:
        self.crops = [eval_transform(pre, short) for short in crop_sizes(tta, pre["resize_size"])]

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([crop(img) for crop in self.crops])


def views_transform(pre: dict, tta) -> Callable:
    """`eval_transform` when `tta` makes one crop (the mirror is made at inference), else `CropsTransform`."""
    return eval_transform(pre) if len(crop_sizes(tta, pre["resize_size"])) == 1 else CropsTransform(pre, tta)


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
    tta = load_value("predict", "tta", Setting, args.params)  # fit the calibration on what predict makes
    ds = ImageFolder(args.data / "valid", transform=views_transform(meta, tta))
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
