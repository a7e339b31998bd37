"""blend: the members' validation logits combined and calibrated; one member is that member."""

import csv
import json

import numpy as np
import pytest
import yaml

from pipeline.config import load_params
from pipeline.params.evaluate import BlendParams, EvaluateParams
from pipeline.scoring import evaluate, read_predictions, write_predictions
from pipeline.stages import blend
from tests.conftest import ROOT

EP = load_params(EvaluateParams, "evaluate", ROOT / "params.yaml")


def members_data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and three members' logits: two good ones whose errors are independent, and one of pure noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    signal = 4 * (2 * y - 1)
    return y, {
        "a": signal + rng.normal(0, 3, n),
        "b": signal + rng.normal(0, 3, n),
        "noise": rng.normal(0, 3, n),
    }


def write_members(folder, y, logits: dict) -> None:
    for name, z in logits.items():
        write_predictions(folder / f"{name}.csv", [f"valid/{i}.jpg" for i in range(len(y))], y, z)


def test_predictions_are_written_exactly(tmp_path):
    y, logits = members_data(20)
    z = logits["a"] / 7
    write_predictions(tmp_path / "a.csv", [f"p{i}" for i in range(20)], y, z)
    paths, labels, back = read_predictions(tmp_path / "a.csv")
    assert paths == [f"p{i}" for i in range(20)] and labels.tolist() == y.tolist()
    assert back.tolist() == z.tolist()  # repr round-trips floats: the blend sees evaluate's logits bit for bit


def test_one_member_is_that_member_with_its_own_calibration():
    y, logits = members_data()
    z = logits["a"][None]
    metrics, _ = blend.blend(z, y, ["a"], BlendParams(method="fit", folds=5), EP)
    own, _ = evaluate(blend.two_class_probs(z[0]), blend.as_two_class_logits(z[0]), y, EP)
    assert metrics["weights"] == {"a": 1.0} and metrics["best_member"] == "a" and "held_out_log_loss" not in metrics
    for key in ("calibration", "clip", "temperature", "temperature_clip", "log_loss", "accuracy"):
        assert metrics[key] == own[key], key
    assert metrics["gain_over_best_member"] == 0.0


def test_the_mean_of_two_independent_members_beats_each_and_fit_drops_a_useless_one():
    y, logits = members_data()
    names = list(logits)
    zs = np.stack([logits[n] for n in names])
    mean, _ = blend.blend(zs[:2], y, names[:2], BlendParams(method="mean", folds=5), EP)
    assert mean["weights"] == {"a": 0.5, "b": 0.5}
    assert mean["log_loss_calibrated"] < min(m["log_loss_calibrated"] for m in mean["members"].values())
    assert mean["gain_over_best_member"] > 0.1

    fit, _ = blend.blend(zs, y, names, BlendParams(method="fit", folds=5), EP)
    assert fit["weights"]["noise"] < 0.05 and sum(fit["weights"].values()) == pytest.approx(1.0)
    held = fit["held_out_log_loss"]
    assert held["fit"] < held["mean"]  # out of sample too: the noise member hurts the plain mean
    assert fit["best_member"] in ("a", "b") and fit["members"]["noise"]["accuracy"] < 0.7


def test_members_evaluated_on_other_images_are_refused(tmp_path):
    y, logits = members_data(10)
    write_members(tmp_path, y, {"a": logits["a"]})
    write_predictions(tmp_path / "b.csv", [f"valid/other{i}.jpg" for i in range(10)], y, logits["b"])
    with pytest.raises(SystemExit, match="covers other validation images"):
        blend.read_members(tmp_path, ["a", "b"])
    with pytest.raises(SystemExit, match=r"run 'dvc repro evaluate@c'"):
        blend.read_members(tmp_path, ["a", "c"])


def test_main_writes_the_metrics_predict_reads_and_the_log_loss_plot(tmp_path):
    y, logits = members_data(200)
    write_members(tmp_path / "valid", y, {"a": logits["a"], "b": logits["b"]})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["members"] = {"a": {}, "b": {"arch": "resnet18"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "metrics" / "blend.json"
    plots = tmp_path / "plots"
    blend.main(["--predictions", str(tmp_path / "valid"), "--metrics", str(out), "--plots", str(plots)]
               + ["--params", str(tmp_path / "params.yaml")])  # fmt: skip
    metrics = json.loads(out.read_text())
    assert metrics["calibration"] in ("clip", "temperature") and set(metrics["weights"]) == {"a", "b"}
    with open(tmp_path / "plots" / "log_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["a", "b", "blend"]
    assert float(rows[-1]["log_loss"]) == pytest.approx(metrics["log_loss_calibrated"], abs=1e-6)
