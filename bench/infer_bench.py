"""Inference throughput of VGG16: PyTorch eager vs ONNX Runtime fp32 / int8 (/ fp16 on CUDA), batch 1 to 64.

`python bench/infer_bench.py --device cpu` writes bench/results/infer_cpu.json (batch 1, 8, 32) and
`--device cuda` infer_cuda.json (batch 1, 8, 32, 64, plus torch_fp16: autocast; ort_fp16 where
onnxruntime-gpu is installed, else the ort_ rows run on the CPU and `ort_provider` says so), shaped
`{"torch_fp32": {"1": img_s, "8": img_s, "32": img_s}, "ort_fp32": {...}, "ort_int8": {...},
"latency_ms": {...}, "device": ..., versions}`, and prints a table. The ONNX files are
made by the pipeline's own `pipeline.stages.export` functions (dynamo export, static QDQ int8 quantization) from
a random-init VGG16: speed does not depend on the weights. Calibration uses random images, which sets
the int8 ranges but not the speed. Each figure: a warm-up call, then `--rounds` calls interleaved with
the other backends'; images/s from the fastest call, latency the median. Compare figures within one
run: this machine is noisy and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.contract import ModelContract  # noqa: E402
from pipeline.data import make_session  # noqa: E402
from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.model import CLASSES, build_model, preprocessing  # noqa: E402
from pipeline.stages.export import export_onnx  # noqa: E402
from pipeline.variants import convert_fp16, quantize_int8  # noqa: E402

BATCHES = (1, 8, 32)


def timed(runs: dict, x: np.ndarray, rounds: int) -> dict[str, tuple[float, float]]:
    """{name: (images/s, median ms per call)} of each `runs[name](x)`, after one warm-up call each.

    The calls are interleaved round by round, so a burst of load from another process hits every backend
    alike, and images/s is from each backend's fastest call (as timeit advises: the slower calls measure
    the other processes, not the code)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(x)
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - t0)
    return {name: (len(x) / min(t), 1000 * float(np.median(t))) for name, t in times.items()}


def export_variants(model: torch.nn.Module, size: int, dest: Path, fp16: bool) -> None:
    """dest/model.onnx (+ .data), model.int8.onnx (and model.fp16.onnx), as the export stage writes them."""
    meta = {
        "classes": CLASSES, **preprocessing("vgg16", size),
        "weights": "none", "params": {}, "run_key": "bench",
    }  # fmt: skip
    metadata = ModelContract.from_checkpoint(meta).onnx_props()
    export_onnx(model, size, dest, metadata, opset=20)
    calibration = np.random.default_rng(0).normal(size=(16, 3, size, size)).astype(np.float32)
    quantize_int8(dest, dest / "model.int8.onnx", calibration, metadata)
    if fp16:
        convert_fp16(dest, dest / "model.fp16.onnx", metadata)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", help="default: 1 8 32 on CPU, 1 8 32 64 on CUDA")
    parser.add_argument("--rounds", type=int, help="timed calls of each backend and batch size; default 3 (CPU), 10")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU: run with --device cpu")
    batches = tuple(args.batches or (BATCHES + ((64,) if cuda else ())))  # the GPU figure: batch 64
    rounds = args.rounds or (10 if cuda else 3)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels at the warm-up call
    model = build_model("vgg16", "none").eval()
    rng = np.random.default_rng(1)
    inputs = {b: rng.normal(size=(b, 3, args.image_size, args.image_size)).astype(np.float32) for b in batches}
    runs = {}  # name -> run(x)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(tmp) / "onnx"
        t0 = time.perf_counter()
        export_variants(model, args.image_size, onnx_dir, fp16=cuda)
        export_seconds = time.perf_counter() - t0

        dev = torch.device(args.device)
        layout = torch.channels_last if cuda else torch.contiguous_format  # channels_last: cuDNN's fast path
        torch_model = model.to(dev, memory_format=layout)
        # PyTorch gets its input already on the device, as a training loop's prefetching loader gives it: the
        # figure is the GPU's, not the PCIe copy's (on CPU the tensor shares the numpy array's memory)
        on_device = {b: torch.from_numpy(x).to(dev, memory_format=layout) for b, x in inputs.items()}

        @torch.inference_mode()
        def torch_run(x, dtype=torch.float32):
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dtype == torch.float16):
                out = torch_model(on_device[len(x)])
            return out.float().cpu().numpy()  # the copy back (N x 2) also waits for the GPU

        runs["torch_fp32"] = torch_run
        if cuda:
            runs["torch_fp16"] = lambda x: torch_run(x, torch.float16)

        # ONNX Runtime on CUDA needs onnxruntime-gpu; a CPU-only build (e.g. a GPU box's stock packages) runs
        # the ort_ rows on the CPU, as ort_provider records, and fp16 (a GPU variant) is left out there
        provider = "cuda" if cuda and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        if cuda and provider == "cpu":
            print(f"onnxruntime {ort.__version__} has no CUDA provider: the ort_ rows run on the CPU, no fp16 row")
        variants = ["fp32", "int8"] + (["fp16"] if provider == "cuda" else [])
        for variant in variants:
            session, _ = make_session(onnx_dir, provider, variant)  # "cuda" raises ModelError if not obtained
            runs[f"ort_{variant}"] = lambda x, s=session: s.run(["probs"], {"image": x})[0]

        results: dict = {name: {} for name in runs}
        latency: dict = {name: {} for name in runs}
        for b in batches:
            for name, (img_s, ms) in timed(runs, inputs[b], rounds).items():
                results[name][str(b)], latency[name][str(b)] = round(img_s, 2), round(ms, 1)
                print(f"{name:>12} batch {b:>2}: {img_s:7.2f} images/s  {ms:8.1f} ms/batch (median)", flush=True)

    def ratio(a: str, b: str) -> dict:
        return {k: round(results[a][k] / results[b][k], 2) for k in results[b]} if a in results else {}

    out = {
        **results,
        "latency_ms": latency,  # median per call (one batch)
        "rounds": rounds,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch_input": f"on {args.device} before timing",
        "ort_provider": provider,
        "ort_input": "numpy on the host (a CUDA provider's copy to the GPU is timed)",
        "image_size": args.image_size,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "ort_int8_vs_fp32": ratio("ort_int8", "ort_fp32"),
        "ort_fp32_vs_torch": ratio("ort_fp32", "torch_fp32"),
        **({"torch_fp16_vs_fp32": ratio("torch_fp16", "torch_fp32")} if cuda else {}),
        "export_seconds": round(export_seconds, 1),
        "bench_seconds": round(time.perf_counter() - t_start, 1),
    }
    path = args.out / f"infer_{args.device}.json"
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")

    print(f"\nimages/s, VGG16 {args.image_size} px, {out['device']} (ONNX Runtime on {provider})")
    print(f"{'':>12} " + " ".join(f"{'batch ' + str(b):>9}" for b in batches))
    for name in runs:
        print(f"{name:>12} " + " ".join(f"{results[name][str(b)]:9.2f}" for b in batches))
    print(f"int8 / fp32 (ONNX Runtime): {out['ort_int8_vs_fp32']}; wrote {path} in {out['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
