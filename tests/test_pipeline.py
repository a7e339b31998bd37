"""End to end: the real `dvc repro` in a temporary git + DVC project."""

import csv
import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import BIN, dvc, make_project, tool_env

pytestmark = pytest.mark.slow


def test_dvc_repro_prepare(tmp_path):
    project = make_project(
        tmp_path / "project",
        {
            "fetch.demo.train_per_class": 30,
            "fetch.demo.test_count": 12,
            "fetch.demo.min_side": 48,
            "fetch.demo.max_side": 96,
            "prepare.valid_per_class": 10,
            "prepare.sample_train_per_class": 8,
            "prepare.sample_valid_per_class": 4,
        },
    )
    log = dvc(project, "repro", "prepare")
    assert "Running stage 'fetch'" in log and "Running stage 'prepare'" in log
    prepared = project / "data" / "prepared"
    with open(prepared / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    count = lambda split, label: sum(r["split"] == split and r["label"] == label for r in rows)  # noqa: E731
    for label in ("cat", "dog"):
        assert count("valid", label) == 10 and count("train", label) == 20
        assert count("sample/train", label) == 8 and count("sample/valid", label) == 4
    assert count("test", "") == 12
    train = {r["path"].split("/")[-1] for r in rows if r["split"] == "train"}
    valid = {r["path"].split("/")[-1] for r in rows if r["split"] == "valid"}
    assert not train & valid
    metrics = json.loads((project / "metrics" / "prepare.json").read_text())
    assert metrics["counts"]["valid"] == {"cat": 10, "dog": 10}
    assert (project / "data" / "raw" / "demo_test_labels.csv").exists()

    # nothing changed: the second run does nothing
    again = dvc(project, "repro", "prepare")
    assert "Running stage" not in again and "up to date" in again
    # a changed param re-runs prepare only
    params = (project / "params.yaml").read_text().replace("valid_per_class: 10", "valid_per_class: 9")
    (project / "params.yaml").write_text(params)
    third = dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in third and "Running stage 'fetch'" not in third


def test_dvc_repro_evaluate(tmp_path):
    project = make_project(
        tmp_path / "project",
        {
            "fetch.demo.train_per_class": 24,
            "fetch.demo.test_count": 4,
            "fetch.demo.min_side": 48,
            "fetch.demo.max_side": 80,
            "prepare.valid_per_class": 6,
            "prepare.sample_train_per_class": 2,
            "prepare.sample_valid_per_class": 2,
            "train.image_size": 32,
            "train.epochs": 2,
            "train.batch_size": 8,
            "train.workers": 0,
            "evaluate.batch_size": 16,
            "evaluate.workers": 0,
            "evaluate.show_images": 4,
        },
    )
    log = dvc(project, "repro", "evaluate")
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert {"accuracy", "log_loss", "clip", "log_loss_clipped"} <= set(metrics)
    assert metrics["n"] == 12 and 0 <= metrics["accuracy"] <= 1
    assert metrics["log_loss_clipped"] <= metrics["log_loss"] + 1e-12
    live = json.loads((project / "dvclive" / "metrics.json").read_text())
    assert {"train_loss", "valid_loss", "valid_accuracy", "valid_log_loss"} <= set(live)
    for name in ("valid_predictions.csv", "clip_curve.csv", "top_losses.png", "most_uncertain.png"):
        assert (project / "plots" / "evaluate" / name).is_file()
    shown = dvc(project, "metrics", "show")
    assert "evaluate.json" in shown and "valid_accuracy" in shown
    assert "up to date" in dvc(project, "repro", "evaluate")
    # a head hyperparameter changed: train runs again on the same feature cache
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] /= 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = json.loads((project / "dvclive" / "metrics.json").read_text())
    again = dvc(project, "repro", "evaluate")
    assert "Running stage 'train'" in again and "Running stage 'features'" not in again
    assert json.loads((project / "dvclive" / "metrics.json").read_text()) != before  # trained anew: other weights


def test_dvc_repro_predict_makes_a_scored_submission(tmp_path):
    project = make_project(
        tmp_path / "project",
        {
            "fetch.demo.train_per_class": 16,
            "fetch.demo.test_count": 12,
            "fetch.demo.min_side": 48,
            "fetch.demo.max_side": 80,
            "prepare.valid_per_class": 4,
            "prepare.sample_train_per_class": 2,
            "prepare.sample_valid_per_class": 2,
            "train.image_size": 32,
            "train.epochs": 1,
            "train.lr": 0.03,  # the demo's 0.1 (40 epochs) blows one epoch on 32 images up: P near 0/1, all wrong
            "train.batch_size": 8,
            "train.workers": 0,
            "evaluate.batch_size": 16,
            "evaluate.workers": 0,
            "evaluate.show_images": 4,
            "export.parity_images": 4,
            "predict.batch_size": 5,
            "predict.workers": 2,
        },
    )
    log = dvc(project, "repro", "predict")
    assert "Running stage 'export'" in log and "Running stage 'predict'" in log
    names = sorted(p.name for p in (project / "models" / "onnx").iterdir())
    assert names == ["model.int8.onnx", "model.onnx", "model.onnx.data"]  # the demo's variants: fp32, int8
    exported = json.loads((project / "metrics" / "export.json").read_text())
    assert exported["max_abs_diff"] <= 1e-4 and exported["ir_version"] <= 13

    with open(project / "data" / "prepared" / "sample_submission.csv") as f:
        expected = sorted(int(r["id"]) for r in csv.DictReader(f))
    with open(project / "submissions" / "submission.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["id", "label"]
        rows = list(reader)
    assert [int(r["id"]) for r in rows] == expected == list(range(1, 13))
    clip = json.loads((project / "metrics" / "evaluate.json").read_text())["clip"]
    assert all(clip - 1e-12 <= float(r["label"]) <= 1 - clip + 1e-12 for r in rows)
    metrics = json.loads((project / "metrics" / "predict.json").read_text())
    assert metrics["n"] == 12 and metrics["clip"] == clip and metrics["unreadable"] == []
    assert 0 <= metrics["accuracy"] <= 1 and metrics["log_loss"] > 0  # scored against the demo's test labels
    assert "up to date" in dvc(project, "repro", "predict")

    # the rest of `make demo`: the package stage into a BentoML store, then the served model's smoke check
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "DOGSCATS_PARAMS": str(project / "params.yaml")}
    assert "Running stage 'package'" in dvc(project, "repro", env=env)
    photo = sorted((project / "data" / "prepared" / "valid" / "dogs").iterdir())[0]
    done = subprocess.run(
        [str(BIN / "python"), "-m", "serving.smoke", str(photo)],
        cwd=project,
        env={**tool_env(), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r'POST /classify \S+ -> 200 \{"label": "(cat|dog)", "p_dog": ', done.stdout), done.stdout
    assert "service stopped (exit code 0)" in done.stdout
