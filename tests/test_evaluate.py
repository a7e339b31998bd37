"""scoring (what evaluate and blend fit with): the clip search and temperature scaling against known answers."""

import numpy as np
import pytest

from pipeline.params.evaluate import EvaluateParams
from pipeline.scoring import best_clip, clip_curve, evaluate, fit_temperature, log_loss, softmax


def test_clip_search_finds_the_analytic_optimum():
    # three right at P=1 and one wrong at P=1: loss(c) = -(3 log(1-c) + log c) / 4, minimal at c = 1/4
    y = np.array([1, 1, 1, 0])
    p = np.ones(4)
    clip, loss = best_clip(clip_curve(p, y, clip_max=0.4, step=0.0005))
    assert clip == pytest.approx(0.25)
    assert loss == pytest.approx(-(3 * np.log(0.75) + np.log(0.25)) / 4)


def test_no_clip_when_nothing_is_wrong():
    y = np.array([0, 1, 1, 0])
    p = np.array([0.01, 0.99, 0.9, 0.2])
    clip, loss = best_clip(clip_curve(p, y, clip_max=0.2, step=0.001))
    assert clip == 0.0 and loss == pytest.approx(log_loss(y, p))


def test_temperature_recovers_an_overconfident_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at T=1 on z
    logits = np.stack([np.zeros_like(z), 3 * z], 1)  # three times overconfident
    assert fit_temperature(logits, y) == pytest.approx(3.0, rel=0.05)


def test_evaluate_reports_the_required_keys():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    logits = np.stack([np.zeros(200), np.where(y == 1, 4.0, -4.0) + rng.normal(0, 3, 200)], 1)
    params = EvaluateParams(
        batch_size=8,
        workers=0,
        lesson_clip=0.05,
        clip_max=0.2,
        clip_step=0.001,
        temperature_scaling=True,
        show_images=4,
    )
    metrics, curve = evaluate(softmax(logits), logits, y, params)
    assert {
        "accuracy",
        "log_loss",
        "clip",
        "log_loss_clipped",
        "log_loss_lesson_clip",
        "confusion_matrix",
        "temperature",
        "log_loss_temperature",
        "temperature_beats_clip",
    } <= set(metrics)
    assert metrics["log_loss_clipped"] <= metrics["log_loss"]
    assert metrics["log_loss_clipped"] <= metrics["log_loss_lesson_clip"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 200
    assert len(curve) == 201 and curve[0][0] == 0.0
    assert metrics["clip_at_max"] is False
    # calibration: the temperature (with a clip searched on top) only when it beats the clip alone
    assert metrics["calibration"] == ("temperature" if metrics["temperature_beats_clip"] else "clip")
    assert metrics["temperature_beats_clip"] == (metrics["log_loss_temperature_clipped"] < metrics["log_loss_clipped"])


def test_a_clip_search_that_ends_at_clip_max_is_flagged_and_the_temperature_picked():
    y = np.array([0, 1] * 50)
    # hopelessly over-confident: a fifth of the images wrong at P = 1 - 1e-9
    margin = np.where(np.arange(100) % 5 == 0, -20.0, 20.0) * np.where(y == 1, 1, -1)
    logits = np.stack([np.zeros(100), margin], 1)
    params = EvaluateParams(8, 0, 0.05, clip_max=0.05, clip_step=0.001, temperature_scaling=True, show_images=4)
    metrics, _ = evaluate(softmax(logits), logits, y, params)
    assert metrics["clip"] == pytest.approx(0.05) and metrics["clip_at_max"] is True
    assert metrics["temperature"] > 5 and metrics["calibration"] == "temperature"
    assert metrics["log_loss_temperature_clipped"] < metrics["log_loss_clipped"]
