"""Which int8 recipe: each static-quantization option's log-loss rise and CPU speed against the fp32 model.

`python bench/int8_options.py [--model models/<member>.pt] [--data data/prepared] [--out
bench/results/int8_options_<member>.json] [--options s8s8_minmax_64 u8s8_minmax_64 ...]` from the project root
after `dvc repro`; the model is by default the one the service serves (package.member, or the best member on
validation in metrics/blend.json), the paths relative to the current folder.

Exports the checkpoint to fp32 ONNX as `pipeline.stages.export` does, pre-processes it once as
`pipeline.variants.quantize_int8` does, then quantizes it once per option in `OPTIONS` (QDQ, per-channel
weights, Softmax in float, as the pipeline's recipe) and scores each on the whole validation set: log loss
and accuracy as `variants.score_variants` computes them, the rise over fp32, and how many images change
class. Speed: images/s at batch 8 on the CPU provider, the option and fp32 timed in turn (best of 3), so
`speedup` compares figures from the same minutes of this noisy, shared machine. Each quantization runs in
its own process under `--timeout` (histogram calibration keeps every activation of VGG16 in memory). One
option is beyond quantize_static's kwargs: `entropy_bins` ranges entropy on a finer histogram first.
`chosen` is the option with the smallest log-loss rise among those at least `--min-speedup` x fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, create_calibrator, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.metrics import log_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.config import load_params  # noqa: E402
from pipeline.contract import ModelContract  # noqa: E402
from pipeline.data import MODEL_FILE, VARIANT_FILES, make_session  # noqa: E402
from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.params.package import PackageParams  # noqa: E402
from pipeline.stages.export import export_onnx  # noqa: E402
from pipeline.stages.package import choose_member  # noqa: E402
from pipeline.variants import CalibrationImages, finish_variant, valid_set  # noqa: E402

log = logging.getLogger("int8_options")
S8S8 = {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8}
U8S8 = {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
# histogram calibration (percentile, entropy) keeps every activation of every image until it is done (~37 MB
# an image for VGG16 at 128 px, estimated): percentile ranges 64 images at a time; MinMax keeps only min, max
MINMAX, ENTROPY = {"calibrate_method": CalibrationMethod.MinMax}, {"calibrate_method": CalibrationMethod.Entropy}
PERCENTILE = {
    "calibrate_method": CalibrationMethod.Percentile,
    "extra_options": {"CalibPercentile": 99.999, "CalibStridedMinMax": 8},  # 8 batches of 8 at a time
}
# name: (calibration images, first Conv and last Gemm/MatMul in float, quantize_static kwargs)
OPTIONS = {
    "s8s8_minmax_64": (64, False, {**S8S8, **MINMAX}),  # the pipeline's recipe before reduce_range
    "s8s8_minmax_256": (256, False, {**S8S8, **MINMAX}),
    "s8s8_percentile_256": (256, False, {**S8S8, **PERCENTILE}),
    "s8s8_entropy_64": (64, False, {**S8S8, **ENTROPY}),
    "s8s8_entropy_64_2048bins": (64, False, {**S8S8, **ENTROPY, "entropy_bins": 2048}),  # not quantize_static's
    "s8s8_minmax_64_reduce_range": (64, False, {**S8S8, **MINMAX, "reduce_range": True}),
    "s8s8_minmax_256_reduce_range": (256, False, {**S8S8, **MINMAX, "reduce_range": True}),
    "u8s8_minmax_64": (64, False, {**U8S8, **MINMAX}),
    "s8s8_minmax_64_float_ends": (64, True, {**S8S8, **MINMAX}),
    "u8s8_minmax_64_reduce_range": (64, False, {**U8S8, **MINMAX, "reduce_range": True}),
}


class StridedImages(CalibrationImages):
    """CalibrationImages that quantize_static can walk in strides (`CalibStridedMinMax`): len() in batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 8):
        self.all = [{input_name: x[i : i + batch]} for i in range(0, len(x), batch)]
        self.batches = iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches = iter(self.all[start_index:end_index])


def float_ends(graph: onnx.GraphProto) -> list[str]:
    """The first Conv and the last Gemm/MatMul of a (topologically sorted) graph."""
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    linears = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + linears[-1:]


def quantize_option(pre: Path, dest: Path, calibration: np.ndarray, metadata: dict, kwargs: dict) -> None:
    """Quantize the pre-processed model `pre` with one option's kwargs into dest (a child process's target)."""
    reader, kwargs = StridedImages(calibration, ModelContract.input_name), dict(kwargs)
    bins = kwargs.pop("entropy_bins", None)
    if bins:  # quantize_static keeps entropy's 128 histogram bins = 128 quantized bins: one candidate threshold,
        # the min-max range (measured: the same model as MinMax). Ranged here with more bins, passed as a cache.
        kwargs["calibration_cache_path"] = dest.with_suffix(".ranges.json")
        op_types = sorted({*QDQRegistry, *QLinearOpsRegistry})  # what quantize_static ranges by default
        calibrator = create_calibrator(
            pre, op_types, str(dest.with_suffix(".aug.onnx")), CalibrationMethod.Entropy,
            use_external_data_format=True, extra_options={"num_bins": bins},
        )  # fmt: skip
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), kwargs["calibration_cache_path"])
    out = dest.with_suffix(".raw.onnx")
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True, **kwargs)
    finish_variant(onnx.load(out), dest, metadata)


def run_with_timeout(timeout: float, *args) -> tuple[float, str | None]:
    """quantize_option(*args) in a fresh process: (seconds, None) or (seconds, why it gave no model)."""
    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=quantize_option, args=args, daemon=True)
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.terminate()
        child.join()
        return time.perf_counter() - t0, f"skipped: quantization took over {timeout:.0f} s"
    why = None if child.exitcode == 0 else f"failed: exit code {child.exitcode} (killed for memory if -9)"
    return time.perf_counter() - t0, why


def probabilities(session, contract: ModelContract, x: np.ndarray) -> np.ndarray:
    """P(class) (N, 2) float64, rows summing to 1, for images x (N, 3, H, W)."""
    probs = np.concatenate([contract.probs(session, x[i : i + 32]) for i in range(0, len(x), 32)]).astype(np.float64)
    return probs / probs.sum(1, keepdims=True)


def score(probs: np.ndarray, y: np.ndarray) -> dict:
    """Validation log loss and accuracy, as `variants.score_variants` computes them."""
    return {"log_loss": float(log_loss(y, probs, labels=[0, 1])), "accuracy": float(np.mean(probs.argmax(1) == y))}


def images_per_s(sessions: list, x: np.ndarray, batches: int, rounds: int) -> list[float]:
    """Images/s of each session at batch len(x), best of `rounds` runs of `batches` calls, taken in turn."""
    feed = {ModelContract.input_name: x}
    for session in sessions:  # warm-up: first-call allocations
        session.run(None, feed)
    best = [float("inf")] * len(sessions)
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(batches):
                session.run(None, feed)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [batches * len(x) / t for t in best]


def cpu_info() -> dict:
    """The CPU's model name and the SIMD flags int8 kernels depend on (Linux /proc/cpuinfo)."""
    info = dict(
        map(str.strip, line.split(":", 1)) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line
    )
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")  # the int8 kernels' choices
    flags = [f for f in wanted if f in info["flags"].split()]
    family_model = f"{info.get('cpu family')}/{info.get('model')}"
    return {"model_name": info.get("model name"), "family_model": family_model, "flags": flags, "cores": os.cpu_count()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Measure int8 quantization options against fp32.")
    parser.add_argument("--model", type=Path, help="default models/<member>.pt, the member the service serves")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="valid/cats, valid/dogs in it")
    parser.add_argument("--out", type=Path, help="JSON results; default bench/results/int8_options_<model>.json")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its package.member")
    parser.add_argument("--blend", type=Path, default=Path("metrics/blend.json"), help="names the best member")
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--max-pixels", type=int, default=25_000_000)
    parser.add_argument("--opset", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one quantization may take")
    parser.add_argument("--batches", type=int, default=4, help="batches of 8 per timed run")
    parser.add_argument("--min-speedup", type=float, default=1.8)
    parser.add_argument("--note", default="", help="written into the JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.model is None:  # the member the service serves, chosen as the package stage chooses it
        member = choose_member(load_params(PackageParams, "package", args.params).member, args.blend)
        args.model = Path("models") / f"{member}.pt"
    if not args.model.is_file():
        raise SystemExit(f"{args.model} not found: run 'dvc repro' first, or pass --model, a checkpoint train wrote")
    args.out = args.out or ROOT / "bench" / "results" / f"int8_options_{args.model.stem}.json"
    model, ckpt = load_model(args.model, "cpu")
    contract = ModelContract.from_checkpoint(ckpt)
    metadata = contract.onnx_props()
    if not any((args.data / "valid").glob("*/*.jpg")):
        raise SystemExit(f"no images in {args.data / 'valid'}: run 'dvc repro prepare' first")
    x, y = valid_set(args.data / "valid", contract, args.max_pixels)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_onnx(model, ckpt["image_size"], work, metadata, args.opset)
        quant_pre_process(
            str(work / MODEL_FILE), str(work / "pre.onnx"), skip_symbolic_shape=True,
            save_as_external_data=True, external_data_location="pre.onnx.data",
        )  # fmt: skip
        fp32, _ = make_session(work, "cpu")
        ref = probabilities(fp32, contract, x)
        base = score(ref, y)
        log.info("fp32: log loss %.4f, accuracy %.4f on %d images", base["log_loss"], base["accuracy"], len(x))
        results, fp32_speeds = {}, []
        graph = onnx.load(work / "pre.onnx", load_external_data=False).graph
        softmax = [n.name for n in graph.node if n.op_type == "Softmax"]  # always float, as in the pipeline
        for name in args.options:
            n, ends, kwargs = OPTIONS[name]
            kwargs = {**kwargs, "nodes_to_exclude": softmax + (float_ends(graph) if ends else [])}
            calibration = x[:: max(1, len(x) // n)][:n]  # spread over the sorted set: both classes
            dest = work / VARIANT_FILES["int8"]
            dest.unlink(missing_ok=True)
            seconds, why = run_with_timeout(args.timeout, work / "pre.onnx", dest, calibration, metadata, kwargs)
            r = {"calibration_images": len(calibration), "float_ends": ends, "quantize_seconds": round(seconds, 1)}
            r["kwargs"] = json.loads(json.dumps(kwargs, default=str))
            if why:
                log.warning("%s: %s", name, why)
                results[name] = {**r, "error": why}
                continue
            int8, _ = make_session(work, "cpu", "int8")
            probs = probabilities(int8, contract, x)
            s = score(probs, y)
            f32_ips, ips = images_per_s([fp32, int8], x[:8], args.batches, rounds=3)
            fp32_speeds.append(f32_ips)
            rise, drop = s["log_loss"] - base["log_loss"], base["accuracy"] - s["accuracy"]
            results[name] = {
                **s, "log_loss_rise": rise, "accuracy_drop": drop,
                "flipped": int(np.sum(probs.argmax(1) != ref.argmax(1))),  # images whose class changed vs fp32
                "images_per_s": round(ips, 2), "fp32_images_per_s": round(f32_ips, 2),
                "speedup": round(ips / f32_ips, 3), **r,
            }  # fmt: skip
            log.info("%s: %s", name, {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)})
    fast = {k: v for k, v in results.items() if "error" not in v and v["speedup"] >= args.min_speedup}
    report = {
        "cpu": cpu_info(),
        "model": str(args.model),
        "n_valid": len(x),
        "image_size": ckpt["image_size"],
        "fp32": {**base, "images_per_s": round(float(np.median(fp32_speeds)), 2) if fp32_speeds else None},
        "options": results,
        "min_speedup": args.min_speedup,
        "chosen": min(fast, key=lambda k: fast[k]["log_loss_rise"]) if fast else None,
        **({"note": args.note} if args.note else {}),
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    log.info("wrote %s: chosen %s", args.out, report["chosen"])


if __name__ == "__main__":
    main()
