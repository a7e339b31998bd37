"""The package stage and the service's start against a missing or unwritable BentoML store."""

import json
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from serving.smoke import free_port, start, stop, wait_ready
from tests.conftest import BIN, ROOT, own_store, tool_env
from tests.test_data import write_tiny_onnx


def write_evaluate(folder: Path) -> Path:
    """An evaluate.json with what package needs: the calibration (here a clip alone) that predict applies."""
    folder.mkdir(parents=True)
    (folder / "evaluate.json").write_text(json.dumps({"accuracy": 0.5, "calibration": "clip", "clip": 0.02}))
    return folder


@pytest.mark.slow
def test_an_unwritable_store_is_a_message_not_a_traceback(tmp_path):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    write_evaluate(tmp_path / "metrics")
    env = {**tool_env(), "BENTOML_HOME": "/proc/no-such-folder/bentoml"}  # cannot be created, even by root
    cmd = ["-m", "pipeline.stages.package", "--onnx", str(onnx_dir), "--metrics", str(tmp_path / "metrics")]
    cmd += ["--out", str(tmp_path / "record.json")]
    done = subprocess.run([str(BIN / "python"), *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "package failed: cannot write the BentoML model store" in done.stderr and "BENTOML_HOME" in done.stderr
    assert not (tmp_path / "record.json").exists()


@pytest.mark.slow
def test_the_service_on_an_empty_store_says_to_run_the_package_stage(tmp_path):
    env = {**tool_env(), "BENTOML_HOME": str(tmp_path / "empty-store")}
    cmd = [str(BIN / "bentoml"), "serve", "serving.service:DogsVsCats", "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "no model 'dogs-vs-cats' in the BentoML store" in done.stdout + done.stderr
    # `dvc repro package` alone skips a stage whose dvc.lock is current, though the store it filled was emptied
    assert "run 'dvc repro package'" in done.stdout + done.stderr
    assert "'dvc repro -f -s package'" in done.stdout + done.stderr


@pytest.mark.slow
def test_an_interrupted_import_is_refused_by_the_service_and_replaced_by_the_next_package(tmp_path):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    write_evaluate(tmp_path / "metrics")
    env = {**tool_env(), "BENTOML_HOME": str(tmp_path / "store")}
    cmd = [str(BIN / "python"), "-m", "pipeline.stages.package", "--onnx", str(onnx_dir)]
    cmd += ["--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "record.json")]
    package = lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    assert package().returncode == 0
    record = json.loads((tmp_path / "record.json").read_text())
    stored = Path(record["store"]) / Path(*record["tag"].split(":")) / "model.onnx"
    whole = stored.read_bytes()
    stored.write_bytes(whole[: len(whole) // 3])  # what a package killed while BentoML copied it leaves

    serve = [str(BIN / "bentoml"), "serve", "serving.service:DogsVsCats", "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(serve, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "is incomplete (files missing or short: model.onnx)" in done.stdout + done.stderr

    again = package()
    assert again.returncode == 0 and "replacing an incomplete copy" in again.stderr, again.stderr
    assert stored.read_bytes() == whole
    third = package()
    assert third.returncode == 0 and "in the store already, complete" in third.stderr  # nothing deleted


@pytest.mark.slow
def test_a_new_calibration_is_a_new_model_version_and_a_model_without_one_is_refused_at_start(tmp_path):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    metrics = write_evaluate(tmp_path / "metrics")
    env = {**tool_env(), "BENTOML_HOME": str(tmp_path / "store")}
    cmd = [str(BIN / "python"), "-m", "pipeline.stages.package", "--onnx", str(onnx_dir)]
    cmd += ["--metrics", str(metrics), "--out", str(tmp_path / "record.json")]

    def package() -> tuple[str, dict]:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        record = json.loads((tmp_path / "record.json").read_text())
        model_yaml = Path(record["store"]) / Path(*record["tag"].split(":")) / "model.yaml"
        return record["tag"], model_yaml

    first, _ = package()
    (metrics / "evaluate.json").write_text(json.dumps({"accuracy": 0.5, "calibration": "clip", "clip": 0.03}))
    second, model_yaml = package()  # the same ONNX files, another calibration: the service must apply the new one
    assert second != first and yaml.safe_load(model_yaml.read_text())["metadata"]["calibration"]["clip"] == 0.03
    assert package()[0] == second  # nothing changed: the same version

    # a model stored without its calibration (by an earlier package): the server exits with the message at once,
    # instead of restarting a worker whose __init__ fails, for ever
    stored = yaml.safe_load(model_yaml.read_text())
    del stored["metadata"]["calibration"]
    model_yaml.write_text(yaml.safe_dump(stored))
    serve = [str(BIN / "bentoml"), "serve", "serving.service:DogsVsCats", "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(serve, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "has no calibration" in done.stdout + done.stderr
    assert "run 'dvc repro -f -s package'" in done.stdout + done.stderr


def test_the_import_is_staged_under_the_store_and_a_killed_runs_leftover_is_removed(tmp_path):
    """BentoML stages an import in tempfile.mkdtemp and removes it only at a normal exit: a killed package left
    600 MB in /tmp for good. It is staged under the store now, where the next package finds and removes it."""
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    write_evaluate(tmp_path / "metrics")
    store, tmp = tmp_path / "store", tmp_path / "tmp"
    tmp.mkdir()
    left = store / "tmp" / "package" / "bentoml-model-dogs-vs-cats-k1ll3d"  # as a SIGKILLed import leaves it
    left.mkdir(parents=True)
    (left / "model.onnx.data").write_bytes(bytes(4096))
    env = {**tool_env(), "BENTOML_HOME": str(store), "TMPDIR": str(tmp)}
    cmd = [str(BIN / "python"), "-m", "pipeline.stages.package", "--onnx", str(onnx_dir)]
    cmd += ["--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "record.json")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted package" in done.stderr and not left.exists()
    assert not list(tmp.glob("bentoml-model-*")) and not list((store / "tmp" / "package").iterdir())  # none left


def test_the_served_member_is_the_best_on_validation_or_the_one_named(tmp_path):
    from pipeline.stages.package import choose_member

    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"members": {"lite0": {}, "lite1": {}}, "best_member": "lite1"}))
    assert choose_member("best", blend) == "lite1"
    assert choose_member("lite0", blend) == "lite0"
    with pytest.raises(SystemExit, match=r"package.member 'lite7' is not a member \(members: lite0, lite1\)"):
        choose_member("lite7", blend)
    with pytest.raises(SystemExit, match=r"run 'dvc repro blend'"):
        choose_member("best", tmp_path / "missing.json")


@pytest.mark.slow
def test_package_with_the_blend_imports_the_chosen_members_folder_and_labels_it(tmp_path):
    for name, size, arch in (("a", 16, "vgg16"), ("b", 24, "resnet18")):
        write_tiny_onnx(tmp_path / "onnx" / name, image_size=size, arch=arch)  # the member's params, in its model
        (tmp_path / "metrics" / name).mkdir(parents=True)
        evaluate = {"accuracy": 0.5, "member": name, "clip": 0.01}
        (tmp_path / "metrics" / name / "evaluate.json").write_text(json.dumps(evaluate))
    (tmp_path / "blend.json").write_text(json.dumps({"members": {"a": {}, "b": {}}, "best_member": "b"}))
    params = (ROOT / "params.yaml").read_text().replace("  model: {}\n", "  a: {}\n  b: {arch: resnet18}\n")
    (tmp_path / "params.yaml").write_text(params)
    env = {**tool_env(), "BENTOML_HOME": str(tmp_path / "store")}
    cmd = [str(BIN / "python"), "-m", "pipeline.stages.package", "--onnx", str(tmp_path / "onnx"), "--blend"]
    cmd += [str(tmp_path / "blend.json"), "--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "rec.json")]
    cmd += ["--params", str(tmp_path / "params.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "serving member b (package.member: best)" in done.stderr
    record = json.loads((tmp_path / "rec.json").read_text())
    model_yaml = (Path(record["store"]) / Path(*record["tag"].split(":")) / "model.yaml").read_text()
    assert "member: b" in model_yaml and "arch: resnet18" in model_yaml and "image_size: 24" in model_yaml
    # the calibration predict applies to this member's logits (its own: the blend is not this member alone)
    assert yaml.safe_load(model_yaml)["metadata"]["calibration"] == {"tta": False, "clip": 0.01}


# Python started with this as its sitecustomize does not see this checkout: the editable install's finder (run from
# its .pth file, before sitecustomize) is taken out, and so is the checkout's folder. The bento's processes import
# the service and `pipeline` from the bento's own src/, as in a container.
WITHOUT_CHECKOUT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p.rstrip("/") != {root!r}]  # the venv inside it stays
"""


@pytest.mark.slow
def test_the_built_bento_serves_from_its_own_src(served, tmp_path):
    """`bentoml build` packages the service with every module it imports (bentofile.yaml's include): served from the
    bento alone, with this checkout off the path, it answers /classify as the service in the checkout does."""
    store = tmp_path / "bentoml"
    env = {k: v for k, v in own_store(served, store).items() if k != "DOGSCATS_PARAMS"}  # the bento's own params
    build = [str(BIN / "bentoml"), "build", "-o", "tag"]
    done = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    src = Path(env["BENTOML_HOME"]) / "bentos" / Path(*tag.split(":")) / "src"
    assert (src / "pipeline" / "calibration.py").is_file() and (src / "serving" / "service.py").is_file()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(WITHOUT_CHECKOUT.format(root=str(ROOT)))
    isolated = {**env, "PYTHONPATH": str(tmp_path / "site")}
    probe = [str(BIN / "python"), "-c", "import pipeline"]
    no_checkout = subprocess.run(probe, cwd=tmp_path, env=isolated, capture_output=True, text=True)
    assert "No module named 'pipeline'" in no_checkout.stderr  # the isolation holds

    photo = sorted((served["tmp"] / "prepared" / "test" / "unknown").glob("*.jpg"))[0]
    files = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    expected = requests.post(f"{served['url']}/classify", files=files, timeout=120).json()
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:
        proc = start(port, isolated, log, target=tag, cwd=tmp_path)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            r = requests.post(f"http://127.0.0.1:{port}/classify", files=files, timeout=120)
            info = requests.get(f"http://127.0.0.1:{port}/info", timeout=30).json()
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}:\n{(tmp_path / 'serve.log').read_text()[-5000:]}")
        finally:
            stop(proc)
    assert r.status_code == 200, r.text
    assert r.json()["p_dog"] == pytest.approx(expected["p_dog"], abs=1e-6)
    assert info["calibration"] == requests.get(f"{served['url']}/info", timeout=30).json()["calibration"]
    log_text = (tmp_path / "serve.log").read_text()
    assert "ModuleNotFoundError" not in log_text
