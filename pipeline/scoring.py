"""Kaggle's metric and the calibration fitted on validation: log loss, the probability clip searched on a grid,
temperature scaling, and the validation logits a member's `evaluate` writes for `blend`.

Not a stage: the stages `evaluate` (one member) and `blend` (the members combined) fit the calibration with it, and
benches score with it. `pipeline.calibration` applies what is fitted here (numpy only, shipped with the service).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import confusion_matrix
from sklearn.metrics import log_loss as sk_log_loss

from pipeline.files import atomic_write_text
from pipeline.params.evaluate import EvaluateParams


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
