"""The package stage and the service's start against a missing or unwritable BentoML store."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, tool_env
from tests.test_data import write_tiny_onnx


@pytest.mark.slow
def test_an_unwritable_store_is_a_message_not_a_traceback(tmp_path):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    (tmp_path / "metrics").mkdir()
    env = {**tool_env(), "BENTOML_HOME": "/proc/no-such-folder/bentoml"}  # cannot be created, even by root
    cmd = ["-m", "pipeline.package", "--onnx", str(onnx_dir), "--metrics", str(tmp_path / "metrics")]
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
    assert "run 'dvc repro package'" in done.stdout + done.stderr


@pytest.mark.slow
def test_an_interrupted_import_is_refused_by_the_service_and_replaced_by_the_next_package(tmp_path):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    (tmp_path / "metrics").mkdir()
    env = {**tool_env(), "BENTOML_HOME": str(tmp_path / "store")}
    cmd = [str(BIN / "python"), "-m", "pipeline.package", "--onnx", str(onnx_dir)]
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


def test_the_import_is_staged_under_the_store_and_a_killed_runs_leftover_is_removed(tmp_path):
    """BentoML stages an import in tempfile.mkdtemp and removes it only at a normal exit: a killed package left
    600 MB in /tmp for good. It is staged under the store now, where the next package finds and removes it."""
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    (tmp_path / "metrics").mkdir()
    store, tmp = tmp_path / "store", tmp_path / "tmp"
    tmp.mkdir()
    left = store / "tmp" / "package" / "bentoml-model-dogs-vs-cats-k1ll3d"  # as a SIGKILLed import leaves it
    left.mkdir(parents=True)
    (left / "model.onnx.data").write_bytes(bytes(4096))
    env = {**tool_env(), "BENTOML_HOME": str(store), "TMPDIR": str(tmp)}
    cmd = [str(BIN / "python"), "-m", "pipeline.package", "--onnx", str(onnx_dir)]
    cmd += ["--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "record.json")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted package" in done.stderr and not left.exists()
    assert not list(tmp.glob("bentoml-model-*")) and not list((store / "tmp" / "package").iterdir())  # none left


def test_the_served_member_is_the_best_on_validation_or_the_one_named(tmp_path):
    from pipeline.package import choose_member

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
    for name, size in (("a", 16), ("b", 24)):
        write_tiny_onnx(tmp_path / "onnx" / name, image_size=size)
        (tmp_path / "metrics" / name).mkdir(parents=True)
        (tmp_path / "metrics" / name / "evaluate.json").write_text(json.dumps({"accuracy": 0.5, "member": name}))
    (tmp_path / "blend.json").write_text(json.dumps({"members": {"a": {}, "b": {}}, "best_member": "b"}))
    params = (ROOT / "params.yaml").read_text().replace("  model: {}\n", "  a: {}\n  b: {arch: resnet18}\n")
    (tmp_path / "params.yaml").write_text(params)
    env = {**tool_env(), "BENTOML_HOME": str(tmp_path / "store")}
    cmd = [str(BIN / "python"), "-m", "pipeline.package", "--onnx", str(tmp_path / "onnx"), "--blend"]
    cmd += [str(tmp_path / "blend.json"), "--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "rec.json")]
    cmd += ["--params", str(tmp_path / "params.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "serving member b (package.member: best)" in done.stderr
    record = json.loads((tmp_path / "rec.json").read_text())
    model_yaml = (Path(record["store"]) / Path(*record["tag"].split(":")) / "model.yaml").read_text()
    assert "member: b" in model_yaml and "arch: resnet18" in model_yaml and "image_size: 24" in model_yaml
