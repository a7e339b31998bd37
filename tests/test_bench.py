"""The benches: the largest-batch search; the training and inference benches end to end on tiny inputs in a Python
where DVC, DVCLive, BentoML, Kaggle and locust cannot be imported (what a GPU machine's stock packages lack); and
every bench that reads a project run with its defaults from inside one after a demo-sized `dvc repro` (issue 22:
load_test's default path had outlived the members), the counts and durations made small."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY_DEMO, dvc, make_project, tool_env

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


# --- the benches with their defaults, run from a project after a demo-sized `dvc repro` ---------------------------


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory):
    """A project after the real `dvc repro` (package into a temporary store): two tiny members, so the benches that
    take one model must find the one the service serves (metrics/blend.json's best member); fp32 + int8 exported."""
    tmp = tmp_path_factory.mktemp("bench")
    project = make_project(
        tmp / "project",
        {
            **TINY_DEMO,
            "train.image_size": 32,
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.workers": 0,
            "evaluate.workers": 0,
            "evaluate.show_images": 2,
            "export.parity_images": 2,
            "predict.workers": 0,
            "members": {"one": {"arch": "resnet18"}, "two": {"arch": "resnet18", "lr": 0.003}},
        },
    )
    dvc(project, "repro", env={"BENTOML_HOME": str(tmp / "bentoml")})
    yield project
    shutil.rmtree(tmp)  # two models, their ONNX files and the store's copy


def run_bench(project: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/<script> ARGS` from inside `project`, as a user runs it from the project root (a project holds
    no bench/ of its own: the checkout's). Any BentoML store it makes is temporary, never ~/bentoml."""
    env = {**tool_env(), "BENTOML_HOME": str(project.parent / "bentoml")}
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)


def ran(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args[1]} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def best_member(project: Path) -> str:
    return json.loads((project / "metrics" / "blend.json").read_text())["best_member"]


@pytest.mark.slow
def test_load_test_serves_the_best_member_with_its_defaults(repro_project, tmp_path):
    out = tmp_path / "load.json"
    small = ["--clients", "2", "--seconds", "2", "--warmup", "1", "--raw-seconds", "0.2", "--idle-after", "0.5",
             "--made-up-paths", "300", "--idle-connections", "300"]  # fmt: skip
    ran(run_bench(repro_project, "load_test.py", *small, "--out", str(out)))
    figures = json.loads(out.read_text())
    assert figures["member"] == best_member(repro_project) and figures["image_size"] == 32
    assert figures["calibration"]["tta"] is False  # the demo's predict.tta, stored by the package stage
    for mode in (figures["batched"], figures["unbatched"]):
        assert mode["requests"] > 0 and mode["errors"] == 0 and mode["rps"] > 0, mode
    assert figures["raw_ort_img_s"] > 0 and figures["variant"] in ("fp32", "int8")
    paths = figures["hostile"]["made_up_paths"]  # 300 different unknown paths add at most one series
    assert paths["statuses"] == {"404": 300} and paths["metrics_bytes_after"] < paths["metrics_bytes_before"] + 20_000
    idle = figures["hostile"]["idle_connections"]
    assert idle["connected"] == 300 and idle["classify_while_held"]["status"] == 200, idle  # under the bound
    assert idle["classify_after"]["status"] == 200, idle
    after = next(v for k, v in idle.items() if k.startswith("after_"))
    assert after["api_open_files"] < idle["api_open_files_before"] + 50, idle  # closed at the header timeout


@pytest.mark.slow
def test_upload_memory_refuses_oversized_uploads_with_its_defaults(repro_project, tmp_path):
    out = tmp_path / "upload.json"
    max_bytes = yaml.safe_load((repro_project / "params.yaml").read_text())["serve"]["max_bytes"]
    over = str(max_bytes // 2**20 + 1)  # MiB: just over the service's byte limit
    ran(run_bench(repro_project, "upload_memory.py", "--uploads", "2", "--mb", over, "--cases", "declared",
                  "--out", str(out)))  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["member"] == best_member(repro_project)
    assert figures["declared"]["statuses"] == ["413"] and figures["declared"]["api_rss_before_mb"] > 0


@pytest.mark.slow
def test_int8_options_scores_the_served_member_with_its_defaults(repro_project, tmp_path):
    out = tmp_path / "int8.json"
    ran(run_bench(repro_project, "int8_options.py", "--options", "s8s8_minmax_64", "--batches", "1", "--out", str(out)))
    figures = json.loads(out.read_text())
    assert figures["model"] == f"models/{best_member(repro_project)}.pt"
    assert figures["n_valid"] == 2 * TINY_DEMO["prepare.valid_per_class"] and figures["fp32"]["log_loss"] > 0
    option = figures["options"]["s8s8_minmax_64"]
    assert "error" not in option and option["log_loss"] > 0 and option["speedup"] > 0, option


@pytest.mark.slow
def test_blend_latency_times_every_member_with_its_defaults(repro_project, tmp_path):
    out = tmp_path / "blend.json"
    ran(run_bench(repro_project, "blend_latency.py", "--rounds", "2", "--out", str(out)))
    figures = json.loads(out.read_text())
    assert figures["members"] == ["one", "two"]
    int8 = all((repro_project / "models" / "onnx" / m / "model.int8.onnx").exists() for m in ("one", "two"))
    for variant in ("fp32", "int8") if int8 else ("fp32",):  # int8 where export kept it (CPU-dependent)
        times = figures[variant]
        assert times["one"] > 0 and times["two"] > 0 and times["blend_over_slowest_member"] >= 1, times


@pytest.mark.slow
def test_prepare_bench_prepares_its_zip_with_small_counts(repro_project, tmp_path):
    small = ["--per-class", "12", "--test", "4", "--valid-per-class", "3"]
    ran(run_bench(repro_project, "prepare_bench.py", *small, "--out", str(tmp_path)))
    figures = json.loads((tmp_path / "prepare_cpu.json").read_text())
    assert figures["images"] == 28 and figures["rejected"] == 0
    assert figures["counts"]["valid"] == {"cat": 3, "dog": 3} and figures["counts"]["test"] == {"unknown": 4}


@pytest.mark.slow
def test_benches_without_their_inputs_say_what_to_provide_in_one_line(repro_project, tmp_path):
    """offline_real and refit_check need a real `make offline` project, absent here; load_test given one member's
    folder needs that member's metrics: each fails with one line that says what to run or pass, no traceback."""
    cases = {
        "offline_real.py": (["--zip", str(tmp_path / "missing.zip")], "--zip"),
        "refit_check.py": (["--project", ".", "--work", str(tmp_path / "work")], "make offline"),
        "load_test.py": (["--onnx", "models/onnx/one"], "--metrics"),
    }
    for script, (args, words) in cases.items():
        done = run_bench(repro_project, script, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and words in lines[0], (script, done.stderr)


@pytest.mark.slow
def test_precision_bench_times_fp32_and_bf16_with_and_without_channels_last(tmp_path):
    """bench/precision.py, briefly (random weights, 32 px): every variant timed, the ratios against fp32 with
    channels_last, the CPU's flags named. bf16 runs on any CPU (emulated where it has no native bf16)."""
    out = tmp_path / "precision.json"
    small = ["--weights", "none", "--image-size", "32", "--batch-size", "4", "--rounds", "1", "--out", str(out)]
    ran(subprocess.run([sys.executable, str(ROOT / "bench" / "precision.py"), *small], cwd=ROOT, capture_output=True,
                       text=True, timeout=600))  # fmt: skip
    figures = json.loads(out.read_text())
    assert set(figures["img_s"]) == {"fp32", "fp32_cl", "bf16", "bf16_cl"}
    assert all(v > 0 for f in figures["img_s"].values() for v in f.values())
    assert figures["vs_fp32_channels_last"]["fp32_cl"] == {"train": 1.0, "features": 1.0}
    assert isinstance(figures["cpu_flags"], list) and figures["cpu"]


@pytest.mark.slow
def test_cpu_step_bench_times_huge_pages_and_frozen_groups_each_in_its_own_process(tmp_path):
    """bench/cpu_step.py, briefly (random weights, 32 px): the forward pass and the training step with 0 and 3 frozen
    layer groups, each with THP_MEM_ALLOC_ENABLE 0 and 1, the ratios, the CPU's flags named."""
    out = tmp_path / "cpu_step.json"
    small = ["--weights", "none", "--image-size", "32", "--batch-size", "4", "--steps", "1", "--rounds", "1"]
    ran(subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_step.py"), *small, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600))  # fmt: skip
    figures = json.loads(out.read_text())
    assert set(figures["img_s"]) == {
        f"{what}, THP {thp}" for what in ("forward", "train, frozen_groups 0", "train, frozen_groups 3") for thp in "01"
    }
    assert all(v > 0 for v in figures["img_s"].values()) and all(v > 0 for v in figures["ratios"].values())
    assert isinstance(figures["cpu"]["flags"], list) and figures["cpu"]["model"]


@pytest.mark.slow
def test_scale_cuts_a_kit_and_measures_make_offline_in_a_clone(demo_zip, tmp_path):
    """bench/scale.py on a kit of 50 demo photos cut to 44: a clone of HEAD runs `make offline` (EfficientNet-Lite0 on
    a few photos) with this venv; each stage's time and peak RSS, the disk, and the submission scored on the kit's
    test labels."""
    kit = tmp_path / "kit"
    kit.mkdir()
    shutil.copy(demo_zip, kit / demo_zip.name)
    shutil.copy(demo_zip.parent / "demo_test_labels.csv", kit / "test_labels.csv")
    out = tmp_path / "scale.json"
    args = ["--kit", str(kit), "--sizes", "44", "--work", str(tmp_path / "work"), "--out", str(out)]
    args += ["--make-args", "OFFLINE_VALID=3", "OFFLINE_MEMBER='~members' '+members={model:{epochs:1}}'"]
    ran(subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), *args], cwd=ROOT, env=tool_env(),
                       capture_output=True, text=True, timeout=1200))  # fmt: skip
    (run,) = json.loads(out.read_text())["runs"]
    assert run["photos"] == 44 and run["test"]["n"] == 8 and 0 <= run["test"]["accuracy"] <= 1  # 18 + 18 + 8
    assert {"prepare", "features@model", "train@model", "predict"} <= set(run["stage_seconds"])
    assert run["stage_peak_rss_bytes"]["train@model"] > 100 * 2**20 and run["dvc_cache_bytes"] > 0
    pss = run["stage_peak_pss_bytes"]["train@model"]
    assert 100 * 2**20 < pss <= run["stage_peak_rss_bytes"]["train@model"]  # shared pages split, not counted twice
    assert run["disk_vs_zip"] > 1 and not (tmp_path / "work" / "project-44").exists()  # the clone is removed


def test_clip_floor_fits_out_of_fold_and_scores_the_test_logits_once(tmp_path):
    """bench/clip_floor.py on written validation and test logits: each floor's out-of-fold loss; the test scored with
    the temperature and clip fitted on all of validation, the clip raised to the floor."""
    import numpy as np

    from pipeline.calibration import sigmoid
    from pipeline.scoring import best_clip, clip_curve, fit_temperature, log_loss

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    z = np.where(y == 1, 1, -1) * rng.gamma(2.0, 3.0, 400)
    z[:6] = -z[:6]  # confident mistakes
    (tmp_path / "predictions" / "valid").mkdir(parents=True)
    (tmp_path / "predictions" / "test").mkdir(parents=True)
    pairs = enumerate(zip(y, z, strict=True))
    rows = "".join(f"valid/{'dogs' if t else 'cats'}/{i}.jpg,{t},{v}\n" for i, (t, v) in pairs)
    (tmp_path / "predictions" / "valid" / "model.csv").write_text("path,label,logit\n" + rows)
    yt, zt = y[:100], z[100:200]
    (tmp_path / "predictions" / "test" / "model.csv").write_text(
        "id,logit\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(zt))
    )
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{i + 1},{t}\n" for i, t in enumerate(yt)))
    out = tmp_path / "clip_floor.json"
    args = ["--project", str(tmp_path), "--score-test", "0.02", "--labels", str(tmp_path / "labels.csv")]
    ran(subprocess.run([sys.executable, str(ROOT / "bench" / "clip_floor.py"), *args, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300))  # fmt: skip
    record = json.loads(out.read_text())
    assert set(record["floors"]) == {"0.0", "0.001", "0.0025", "0.005", "0.01", "0.02"} and record["n"] == 400
    assert all(f["clip_on_all"] >= float(k) for k, f in record["floors"].items())
    t = fit_temperature(np.stack([np.zeros_like(z), z], 1), y)
    clip = max(best_clip(clip_curve(sigmoid(z / t), y, 0.2, 0.0005))[0], 0.02)
    expected = log_loss(yt, np.clip(sigmoid(zt / t), clip, 1 - clip))
    assert record["test"]["log_loss"] == pytest.approx(expected) and record["test"]["n"] == 100


@pytest.mark.slow
def test_device_check_runs_its_cpu_steps_and_lists_each_with_its_status(tmp_path):
    """bench/device_check.sh as a lent GPU runs it, small and on CPU (DEVICE=cpu QUICK=1): the environment, then
    train under torchrun in a world of 1 (the DDP path), which must equal the plain 1-process run."""
    env = {**tool_env(), "DEVICE": "cpu", "QUICK": "1", "OUT": str(tmp_path), "PY": sys.executable}
    done = subprocess.run(["bash", "bench/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "device_check_cpu.log").read_text()
    summary = json.loads((tmp_path / "device_check_cpu.json").read_text())
    assert summary["device"] == "cpu" and summary["steps"]["ddp"]["exit"] == "0"
    runs = json.loads((tmp_path / "ddp_cpu.json").read_text())["runs"]
    assert set(runs) == {"1_process", "1_process_torchrun"} and runs["1_process_torchrun"]["max_diff"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_device_check_without_a_gpu_says_so_in_one_line(tmp_path):
    env = {**tool_env(), "OUT": str(tmp_path), "PY": sys.executable}
    done = subprocess.run(["bash", "bench/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("device_check: PyTorch sees no CUDA device"), done.stderr
