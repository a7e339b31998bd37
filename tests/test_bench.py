"""The benches: the largest-batch search, and both benches end to end on tiny inputs in a Python where DVC,
DVCLive, BentoML, Kaggle and locust cannot be imported (what a GPU machine's stock packages lack)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

NOT_INSTALLED = ["dvclive", "dvc", "bentoml", "kaggle", "locust"]
# `import x` fails for a module whose sys.modules entry is None, as it would where x is not installed
WITHOUT = (
    "import runpy, sys; sys.modules.update(dict.fromkeys({names!r})); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def load_train_bench():
    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench" / "train_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def oom_above(limit: int, tried: list):
    def step(batch: int) -> None:
        tried.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} GiB")

    return step


def test_largest_batch_is_the_last_doubling_that_fits():
    largest_batch, tried = load_train_bench().largest_batch, []
    assert largest_batch(oom_above(100, tried), start=8, limit=1024) == 64
    assert tried == [8, 16, 32, 64, 128]  # stops at the first that does not fit


def test_largest_batch_stops_at_the_limit_and_says_0_when_nothing_fits():
    largest_batch, tried = load_train_bench().largest_batch, []
    assert largest_batch(oom_above(10**6, tried), start=32, limit=256) == 256
    assert tried == [32, 64, 128, 256]
    assert largest_batch(oom_above(16, []), start=32, limit=256) == 0


def test_largest_batch_does_not_swallow_other_errors():
    def step(batch: int) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        load_train_bench().largest_batch(step, start=8, limit=64)


def run_without_dvc(script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", WITHOUT.format(names=NOT_INSTALLED), str(ROOT / "bench" / script), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_infer_bench_writes_its_figures_without_dvc_or_bentoml(tmp_path):
    run_without_dvc(
        "infer_bench.py", "--device", "cpu", "--image-size", "32", "--batches", "1", "2", "--rounds", "1",
        "--out", str(tmp_path),
    )  # fmt: skip
    out = json.loads((tmp_path / "infer_cpu.json").read_text())
    for name in ("torch_fp32", "ort_fp32", "ort_int8"):
        assert set(out[name]) == {"1", "2"} and all(v > 0 for v in out[name].values()), name
    assert "ort_fp16" not in out  # a GPU variant: not timed on the CPU
    assert out["ort_provider"] == "cpu" and out["image_size"] == 32
    assert set(out["ort_int8_vs_fp32"]) == {"1", "2"}
    assert out["device"].startswith("cpu")


@pytest.mark.slow
def test_train_bench_writes_its_figures_without_dvc_or_bentoml(tmp_path):
    run_without_dvc(
        "train_bench.py", "--device", "cpu", "--image-size", "32", "--batch-size", "2", "--seconds", "0.2",
        "--workers", "0", "--out", str(tmp_path),
    )  # fmt: skip
    out = json.loads((tmp_path / "train_cpu.json").read_text())
    assert out["batch_size"] == 2 and out["image_size"] == 32 and out["device"].startswith("cpu")
    for key in ("full_img_s", "head_uncached_img_s", "head_cached_img_s", "features_img_s", "loader_img_s"):
        assert out[key] > 0, key
    assert out["cached_vs_uncached_head"] == pytest.approx(out["head_cached_img_s"] / out["head_uncached_img_s"], 0.01)
