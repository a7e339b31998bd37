"""Shared fixtures: tiny demo data sets written into tmp_path, one real `bentoml serve` per session, and the
features and train stages run on a tiny prepared set (tests/test_train.py and tests/test_features.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.demo import write_demo_zip
from pipeline.params.fetch import DemoParams
from pipeline.params.prepare import PrepareParams
from pipeline.stages.prepare import prepare
from serving.smoke import free_port, start, stop, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "real-photos-200px"
BIN = Path(sys.executable).parent  # the venv's bin: dvc, bentoml, and the python stages run with
MAX_BYTES, MAX_PIXELS = 300_000, 4_000_000  # the served model's upload limits (serve section)


def tool_env() -> dict:
    """The environment for subprocesses: the venv first on PATH (dvc stages call `python`)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def dvc(project: Path, *args: str, env: dict | None = None) -> str:
    """Run the real dvc in `project` (`env`: added to tool_env()); fail the test with its output if it fails."""
    env = {**tool_env(), **(env or {})}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


# the demo shrunk for an end-to-end `dvc repro`: a few dozen 48-80 px images, a handful of validation and test ones
TINY_DEMO = {
    "fetch.demo.train_per_class": 16,
    "fetch.demo.test_count": 6,
    "fetch.demo.min_side": 48,
    "fetch.demo.max_side": 80,
    "prepare.valid_per_class": 4,
    "prepare.sample_train_per_class": 2,
    "prepare.sample_valid_per_class": 2,
}


def tiny_demo(**overrides) -> DemoParams:
    values = dict(
        seed=7, train_per_class=20, test_count=10, min_side=48, max_side=80, mislabel_fraction=0.05, hard_fraction=0.1
    )
    return DemoParams(**{**values, **overrides})


def tiny_prepare(**overrides) -> PrepareParams:
    values = dict(
        seed=1,
        valid_per_class=5,
        valid_fraction=0.0,
        sample_train_per_class=3,
        sample_valid_per_class=2,
        max_pixels=1_000_000,
        workers=1,
    )
    return PrepareParams(**{**values, **overrides})


def run(*args, env=None):
    """Run the venv's python with `args` in the repo; fail the test with its stderr if it fails."""
    done = subprocess.run(
        [str(BIN / "python"), *args], cwd=ROOT, env=env or tool_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A tiny model trained, evaluated, exported, blended, predicted and packaged by the real stages with dvc.yaml's
    layout (one member, `model`; flip + close-crop TTA), served by the real `bentoml serve`. One per session:
    tests/test_service.py, tests/test_page.py and tests/test_package.py share it."""
    tmp = tmp_path_factory.mktemp("serve")
    write_demo_zip(tmp / "c.zip", tmp / "labels.csv", tiny_demo(train_per_class=24, test_count=8))
    prepare(tmp / "c.zip", tmp / "prepared", tiny_prepare(valid_per_class=4))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")
    params["predict"].update(tta="flip+close")  # the service must apply it as predict does
    params["serve"].update(max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_batch_size=8, max_latency_ms=20000)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    p = ["--params", str(tmp / "params.yaml")]
    member, data = "model", ["--data", str(tmp / "prepared")]
    onnx, metrics = tmp / "onnx" / member, tmp / "metrics" / member  # dvc.yaml's <stage folder>/<member>
    run("-m", "pipeline.stages.features", *data, "--out", str(tmp / "features"), *p)
    run(
        "-m", "pipeline.stages.train", *data, "--features", str(tmp / "features"), "--model", str(tmp / "model.pt"),
        "--checkpoint", str(tmp / "ckpt.pt"), "--live", str(tmp / "live"), *p,
    )  # fmt: skip
    # the validation metrics go into the model store's metadata: the page shows them
    run(
        "-m", "pipeline.stages.evaluate", *data, "--model", str(tmp / "model.pt"),
        "--metrics", str(metrics / "evaluate.json"),
        "--plots", str(tmp / "plots"), "--predictions", str(tmp / "predictions" / f"{member}.csv"), *p,
    )  # fmt: skip
    run(
        "-m", "pipeline.stages.export", "--model", str(tmp / "model.pt"), *data, "--out", str(onnx),
        "--metrics", str(metrics / "export.json"), *p,
    )  # fmt: skip
    blend = ["--blend", str(tmp / "metrics" / "blend.json")]
    run("-m", "pipeline.stages.blend", "--predictions", str(tmp / "predictions"), "--metrics", blend[1], "--plots",
        str(tmp / "plots" / "blend"), *p)  # fmt: skip
    run(
        "-m", "pipeline.stages.predict", "--onnx", str(tmp / "onnx"), *data, *blend,
        "--labels", str(tmp / "labels.csv"),
        "--submission", str(tmp / "submission.csv"), "--metrics", str(tmp / "metrics" / "predict.json"), *p,
    )  # fmt: skip
    env = {**tool_env(), "BENTOML_HOME": str(tmp / "bentoml"), "DOGSCATS_PARAMS": str(tmp / "params.yaml")}
    run(
        "-m", "pipeline.stages.package", "--onnx", str(tmp / "onnx"), "--metrics", str(tmp / "metrics"), *blend,
        "--out", str(tmp / "bentoml-model.json"), *p, env=env,
    )  # fmt: skip

    port = free_port()
    log = open(tmp / "serve.log", "w")
    proc = start(port, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
    except (RuntimeError, TimeoutError) as e:
        stop(proc)
        pytest.fail(f"{e}:\n{(tmp / 'serve.log').read_text()}")
    yield {"url": url, "tmp": tmp, "env": env, "proc": proc, "onnx": onnx, "metrics": metrics}
    assert stop(proc) == 0  # SIGTERM stops the API and the model service cleanly, within a minute
    log.close()
    shutil.rmtree(tmp)  # a model, its ONNX and the store's copy: ~2 GB


def own_store(served: dict, dest: Path) -> dict:
    """The served fixture's env with a BENTOML_HOME of its own at `dest` (the store's files hard-linked): two servers
    on one BENTOML_HOME share its Prometheus folder, which each clears at start, taking the served fixture's metrics
    from the tests after this one."""
    shutil.copytree(Path(served["env"]["BENTOML_HOME"]), dest, copy_function=os.link,
                    ignore=shutil.ignore_patterns("prometheus*"))  # fmt: skip
    return {**served["env"], "BENTOML_HOME": str(dest)}


@pytest.fixture
def demo_zip(tmp_path) -> Path:
    """A competition zip of 20 cats, 20 dogs and 10 test images, Kaggle's layout."""
    raw = tmp_path / "raw"
    raw.mkdir()
    path = raw / "dogs-vs-cats-redux-kernels-edition.zip"
    write_demo_zip(path, raw / "demo_test_labels.csv", tiny_demo())
    return path


def changed_params(changes: dict) -> dict:
    """The committed params.yaml with `changes` ({"section.key": value})."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return params


def make_project(dest: Path, params_update: dict) -> Path:
    """A git + DVC project in `dest` with this project's code and a params.yaml changed by `params_update`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "serving"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    (dest / "downloads").mkdir()  # a dependency of fetch: the browser zip's home
    shutil.copy(ROOT / "downloads" / ".gitignore", dest / "downloads" / ".gitignore")
    (dest / "params.yaml").write_text(yaml.safe_dump(changed_params(params_update), sort_keys=False))
    git = lambda *args: subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    dvc(dest, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")  # no analytics; outputs linked to the cache
    shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")  # the plot templates dvc.yaml names
    return dest


# --- features and train: the real stages on a tiny prepared set ---------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """data/prepared from a demo of 40 cats and 40 dogs, 4 of each held out for validation; one per test module."""
    tmp = tmp_path_factory.mktemp("data")
    write_demo_zip(tmp / "c.zip", tmp / "labels.csv", tiny_demo(train_per_class=40, test_count=2))
    prepare(tmp / "c.zip", tmp / "prepared", tiny_prepare(valid_per_class=4))
    return tmp / "prepared"


def write_params(path: Path, **train) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(dict(image_size=32, epochs=3, batch_size=8, workers=0, device="cpu"), **train)
    path.write_text(yaml.safe_dump(params))
    return path


def features_cmd(work: Path, prepared: Path, params: Path) -> list[str]:
    out = ["--out", str(work / "features"), "--params", str(params)]
    return [sys.executable, "-m", "pipeline.stages.features", "--data", str(prepared), *out]


def features(work: Path, prepared: Path, params: Path) -> str:
    """Run the features stage (train reads its output: the cache, or a note that none applies)."""
    done = subprocess.run(features_cmd(work, prepared, params), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stderr


def train_cmd(work: Path, prepared: Path, params: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.stages.train",
        "--data",
        str(prepared),
        "--features",
        str(work / "features"),
        "--model",
        str(work / "model.pt"),
        "--checkpoint",
        str(work / "ckpt.pt"),
        "--live",
        str(work / "live"),
        "--params",
        str(params),
    ]


def run_train(work: Path, prepared: Path, params: Path) -> str:
    features(work, prepared, params)
    done = subprocess.run(train_cmd(work, prepared, params), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stderr


def weights(path: Path) -> dict:
    import torch  # here, not at the top: every test file imports this module, most without torch

    return torch.load(path, weights_only=False)["model"]
