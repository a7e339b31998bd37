"""Stage `blend`: the members' validation predictions combined into one, and calibrated as `evaluate` does.

`python -m pipeline.stages.blend --predictions predictions/valid --metrics metrics/blend.json --plots plots/blend`
(run by `dvc repro blend`, after every member's `evaluate`).

Each member's `evaluate` wrote the logit (z_dog - z_cat, with TTA when `predict.tta`) of every validation
image, made as `predict` makes the test set's. The blend's logit is a weighted sum of the members' logits:
equal weights (`blend.method: mean`, the mean of logits) or weights >= 0 fitted on the validation set
(`fit`); a fit on the set it is scored on flatters it, so the gain of fitting is also measured out of
sample, `blend.folds` folds, and reported beside the in-sample figure. Then the blend is calibrated on
validation exactly as `evaluate` calibrates one model (a clip, or a temperature and a clip), and
`metrics/blend.json` holds what `predict` applies: the members, their weights and the calibration. With one
member the blend is that member: weight 1, and the calibration its own `evaluate` chose.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from pipeline.config import load_params, setup_logging
from pipeline.files import atomic_write_text
from pipeline.params.evaluate import BlendParams, EvaluateParams
from pipeline.params.train import member_names
from pipeline.scoring import evaluate, fit_temperature, log_loss, read_predictions

log = logging.getLogger("blend")


def as_two_class_logits(z: np.ndarray) -> np.ndarray:
    """(N, 2) logits [cat, dog] whose softmax is expit(z): what `evaluate` takes."""
    return np.stack([-z / 2, z / 2], axis=1)


def calibrated_log_loss(metrics: dict) -> float:
    """The validation log loss after the calibration `evaluate` chose (what predict's P would score)."""
    if metrics["calibration"] == "temperature":
        return metrics["log_loss_temperature_clipped"]
    return metrics["log_loss_clipped"]


def two_class_probs(z: np.ndarray) -> np.ndarray:
    """(N, 2) probabilities [P(cat), P(dog)] of logits z = z_dog - z_cat."""
    p = expit(z)
    return np.stack([1 - p, p], axis=1)


def fit_weights(zs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights >= 0, summing to 1, of the members' logits zs (M, N) minimising the log loss of sigmoid(s * w @ zs)
    over w and a free scale s (the temperature, refitted afterwards, takes the scale)."""
    m = len(zs)

    def nll(v: np.ndarray) -> float:
        z = np.clip(v @ zs, -50, 50)
        return float(-np.mean(y * -np.logaddexp(0, -z) + (1 - y) * -np.logaddexp(0, z)))

    res = minimize(nll, np.full(m, 1.0 / m), method="L-BFGS-B", bounds=[(0, None)] * m)
    w = np.maximum(res.x, 0)
    if not w.sum() > 0:  # every member useless (random): fall back to equal weights, said by the caller's metrics
        return np.full(m, 1.0 / m)
    return w / w.sum()


def member_weights(zs: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """The members' weights: equal (`mean`, and always for one member), or fitted on (zs, y) (`fit`)."""
    return fit_weights(zs, y) if method == "fit" and len(zs) > 1 else np.full(len(zs), 1.0 / len(zs))


def fold_log_loss(zs: np.ndarray, y: np.ndarray, method: str, folds: int, seed: int = 0) -> float:
    """The log loss of the blend on held-out folds of validation: weights (for `fit`) and temperature fitted on
    the other folds, so the figure is what a fit gains on images it has not seen."""
    order = np.random.default_rng(seed).permutation(len(y))
    p = np.empty(len(y))
    for k in range(folds):
        held = order[k::folds]
        rest = np.setdiff1d(order, held)
        w = member_weights(zs[:, rest], y[rest], method)
        t = fit_temperature(as_two_class_logits(w @ zs[:, rest]), y[rest])
        p[held] = expit(w @ zs[:, held] / t)
    return log_loss(y, p)


def read_members(folder: Path, names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, labels, logits (M, N)) of the members' validation predictions; they must cover the same images."""
    paths, labels, zs = None, None, []
    for name in names:
        path = folder / f"{name}.csv"
        if not path.exists():
            raise SystemExit(f"{path} not found: run 'dvc repro evaluate@{name}' (each member's evaluate writes it)")
        try:
            p, t, z = read_predictions(path)
        except (ValueError, KeyError) as e:
            raise SystemExit(f"{path} is not a predictions file ({e}): run 'dvc repro evaluate@{name}' again") from None
        if paths is not None and (p != paths or not np.array_equal(t, labels)):
            raise SystemExit(
                f"{path} covers other validation images than {folder / names[0]}.csv: the members were evaluated on "
                "different prepared data; run 'dvc repro' so every member is evaluated on the current one"
            )
        paths, labels = p, t
        zs.append(z)
    return paths, labels, np.stack(zs)


def blend(zs: np.ndarray, y: np.ndarray, names: list[str], bp: BlendParams, ep: EvaluateParams) -> tuple[dict, list]:
    """The blend's metrics (its calibration, what predict applies, at the top level) and its clip curve."""
    members = {}
    for name, z in zip(names, zs, strict=True):
        members[name], _ = evaluate(two_class_probs(z), as_two_class_logits(z), y, ep)
    weights = member_weights(zs, y, bp.method)
    z = weights @ zs
    logits = as_two_class_logits(z)
    metrics, curve = evaluate(two_class_probs(z), logits, y, ep)
    metrics["log_loss_calibrated"] = calibrated_log_loss(metrics)
    metrics["method"] = bp.method
    metrics["weights"] = {name: float(w) for name, w in zip(names, weights, strict=True)}
    member_table = {}
    for name, m in members.items():
        member_table[name] = {
            "accuracy": m["accuracy"],
            "log_loss": m["log_loss"],
            "log_loss_calibrated": calibrated_log_loss(m),
        }
    metrics["members"] = member_table
    best = min(member_table, key=lambda n: (member_table[n]["log_loss_calibrated"], n))
    metrics["best_member"] = best
    best_ll = member_table[best]["log_loss_calibrated"]
    metrics["gain_over_best_member"] = (best_ll - metrics["log_loss_calibrated"]) / best_ll if best_ll > 0 else 0.0
    if len(zs) > 1 and bp.folds >= 2:
        metrics["folds"] = bp.folds
        metrics["held_out_log_loss"] = {k: fold_log_loss(zs, y, k, bp.folds) for k in ("mean", "fit")}
    return metrics, curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Blend the members' validation predictions and calibrate the blend.")
    parser.add_argument("--predictions", type=Path, required=True, help="folder of <member>.csv (evaluate writes them)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics/blend.json: what predict applies")
    parser.add_argument("--plots", type=Path, required=True, help="folder for the plot files")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    bp = load_params(BlendParams, "blend", args.params)
    ep = load_params(EvaluateParams, "evaluate", args.params)
    names = member_names(args.params)
    _, y, zs = read_members(args.predictions, names)
    metrics, curve = blend(zs, y, names, bp, ep)
    args.plots.mkdir(parents=True, exist_ok=True)
    rows = [(name, f"{m['log_loss_calibrated']:.6f}") for name, m in metrics["members"].items()]
    with open(args.plots / "log_loss.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(
            [("model", "log_loss"), *rows, ("blend", f"{metrics['log_loss_calibrated']:.6f}")]
        )
    with open(args.plots / "clip_curve.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("clip", "log_loss"), *curve])
    atomic_write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    for name, m in metrics["members"].items():
        log.info(
            "%s: accuracy %.4f  log loss %.4f, calibrated %.4f  weight %.3f",
            name, m["accuracy"], m["log_loss"], m["log_loss_calibrated"], metrics["weights"][name],
        )  # fmt: skip
    log.info(
        "blend (%s of %d): accuracy %.4f  log loss %.4f, calibrated (%s) %.4f: %.1f%% below the best member, %s",
        bp.method, len(names), metrics["accuracy"], metrics["log_loss"], metrics["calibration"],
        metrics["log_loss_calibrated"], 100 * metrics["gain_over_best_member"], metrics["best_member"],
    )  # fmt: skip
    if "held_out_log_loss" in metrics:
        held = metrics["held_out_log_loss"]
        log.info(
            "held out (%d folds, weights and temperature fitted on the others): mean %.4f, fit %.4f",
            bp.folds, held["mean"], held["fit"],
        )  # fmt: skip


if __name__ == "__main__":
    main()
