"""Training throughput: where an epoch's time goes, in images per second, on CPU or CUDA.

`python bench/train_bench.py --device cpu` (or `make bench`) writes bench/results/train_cpu.json
(train_cuda.json with --device cuda) and prints a table of:

    full_img_s          a training step of the whole network (finetune: all)
    head_uncached_img_s a head-only step that recomputes the frozen backbone (finetune: head, no cache)
    head_cached_img_s   a head-only epoch on cached fc7 activations, through the pipeline's own loader
    features_img_s      the frozen backbone's forward pass alone (what the features stage does)
    loader_img_s        JPEG decoding + preprocessing alone, through a DataLoader with --workers

The batch is 8 on CPU; on CUDA it is the largest power of two (32 to 1024) at which a full training step
fits in the GPU's memory, found by trying each (`largest_batch`), unless --batch-size sets it. Each figure
is measured over a short window after a warm-up, with the pipeline's own code
(`train_steps`, `frozen_part`, `ArrayDataset`), on synthetic tensors for the compute figures so that
data loading does not hide in them. Compare figures within one run: this machine is noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torchvision.datasets import ImageFolder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.demo import make_image  # noqa: E402
from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.model import (  # noqa: E402
    autocast,
    build_model,
    eval_transform,
    frozen_part,
    param_groups,
    preprocessing,
    set_train_mode,
    to_device,
)
from pipeline.params.fetch import DemoParams  # noqa: E402
from pipeline.training import ArrayDataset, train_steps  # noqa: E402


def timed(fn, seconds: float, warmup: int, device: torch.device) -> tuple[float, int]:
    """Call fn() (returning images done) until `seconds` pass, after `warmup` calls; (img/s, calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    done, calls, t0 = 0, 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        done += fn()
        calls += 1
    sync(device)
    return done / (time.perf_counter() - t0), calls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(finetune: str, size: int, device: torch.device):
    """step(batch) -> batch: one train_steps step of a synthetic batch of that many images, the backbone
    frozen or not. The batch's tensors are kept while its size stays the same (timing), remade when it
    changes (the largest-batch search)."""
    model = build_model("vgg16", "none").to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, finetune, 1e-4, 0.1), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    data: list = []

    def step(batch: int) -> int:
        if not data or len(data[0][1]) != batch:
            data[:] = [(torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,)))]
        set_train_mode(model, finetune)
        train_steps(model, data, opt, sched, device, desc=finetune)
        return batch

    return step


def train_step_img_s(finetune: str, bs: int, size: int, device, seconds: float, warmup: int) -> float:
    """Images/s of train_steps over synthetic batches, the backbone frozen or not."""
    step = train_step(finetune, size, device)
    return timed(lambda: step(bs), seconds, warmup, device)[0]


def largest_batch(step, start: int, limit: int) -> int:
    """The largest of start, 2 start, 4 start ... up to `limit` for which `step(batch)` runs without the GPU
    running out of memory (the GPU recipe's "largest batch that fits"); 0 when not even `start` fits."""
    best, batch = 0, start
    while batch <= limit:
        try:
            step(batch)
        except torch.OutOfMemoryError:
            break
        finally:
            gc.collect()  # the failed step's tensors: free them before the next, larger try
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        best, batch = batch, batch * 2
    return best


def head_cached_img_s(bs: int, device, n: int = 8192) -> float:
    """Images/s of one epoch of the head on memory-mapped fc7 activations, via the pipeline's loader."""
    model = build_model("vgg16", "none").to(device)
    head = model.classifier[6]
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        arr = np.lib.format.open_memmap(f"{tmp}/x.npy", mode="w+", dtype=np.float32, shape=(n, 4096))
        arr[:] = np.random.default_rng(0).random((n, 4096), dtype=np.float32)
        arr.flush()
        ds = ArrayDataset(np.load(f"{tmp}/x.npy", mmap_mode="r"), np.random.default_rng(1).integers(0, 2, n))
        loader = DataLoader(ds, batch_size=bs, shuffle=True, pin_memory=device.type == "cuda")
        train_steps(head, loader, opt, sched, device, desc="warm-up")
        sync(device)
        t0 = time.perf_counter()
        train_steps(head, loader, opt, sched, device, desc="head cached")
        sync(device)
        return n / (time.perf_counter() - t0)


@torch.no_grad()
def features_img_s(bs: int, size: int, device, seconds: float, warmup: int) -> float:
    trunk = frozen_part(build_model("vgg16", "none").to(device, memory_format=torch.channels_last), "head")
    x = torch.randn(bs, 3, size, size)

    def step() -> int:
        with autocast(device):
            trunk(to_device(x, device)).float().sum().item()
        return bs

    return timed(step, seconds, warmup, device)[0]


def jpeg_folder(root: Path, n: int) -> Path:
    """`n` demo JPEGs of real photos' sizes (300-500 px) in ImageFolder layout."""
    params = DemoParams(
        seed=0, train_per_class=0, test_count=0, min_side=300, max_side=500, mislabel_fraction=0.0, hard_fraction=0.1
    )
    rng = np.random.default_rng(0)
    for i in range(n):
        label = ("cat", "dog")[i % 2]
        (root / f"{label}s").mkdir(parents=True, exist_ok=True)
        (root / f"{label}s" / f"{label}.{i}.jpg").write_bytes(make_image(rng, label, params)[0])
    return root


def loader_img_s(root: Path, bs: int, size: int, workers: int, seconds: float) -> float:
    """Images/s of JPEG decoding + preprocessing through a DataLoader of `workers` processes. Drawn with
    replacement, so one iterator runs the whole window however few images there are next to the batch:
    no epoch restarts, which would drain the workers' prefetched batches and under-read a GPU box."""
    ds = ImageFolder(root, transform=eval_transform(preprocessing("vgg16", size)))
    sampler = RandomSampler(ds, replacement=True, num_samples=1 << 30)
    it, done = iter(DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=workers)), 0
    next(it)  # warm-up: workers started
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += len(next(it)[0])
    return done / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, help="default: 8 on CPU; CUDA: the largest that fits, 32 to 1024")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, help="timed window per figure; default 15 on CPU, 10 on CUDA")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers for loader_img_s")
    parser.add_argument("--images", type=Path, help="an ImageFolder of JPEGs; default: generated demo photos")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bs = args.batch_size or 8
    if cuda and not args.batch_size:
        step = train_step("all", args.image_size, device)  # a full fine-tune step takes the most memory
        bs = largest_batch(lambda batch: (step(batch), sync(device)), start=32, limit=1024)
        del step
        if not bs:
            raise SystemExit(f"a full training step at batch 32, {args.image_size} px, does not fit on this GPU")
        print(f"largest batch that fits a full training step: {bs}", flush=True)
    seconds = args.seconds or (10.0 if cuda else 15.0)
    warmup = 5 if cuda else 1

    results = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": bs,
        "batch_size_from": "--batch-size" if args.batch_size else ("largest that fits" if cuda else "CPU default"),
        "image_size": args.image_size,
        "seconds_per_figure": seconds,
        "loader_workers": args.workers,
    }
    results["full_img_s"] = train_step_img_s("all", bs, args.image_size, device, seconds, warmup)
    results["head_uncached_img_s"] = train_step_img_s("head", bs, args.image_size, device, seconds, warmup)
    results["head_cached_img_s"] = head_cached_img_s(bs, device)
    results["features_img_s"] = features_img_s(bs, args.image_size, device, seconds, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.images or jpeg_folder(Path(tmp), 256)
        results["loader_img_s"] = loader_img_s(root, bs, args.image_size, args.workers, seconds)
    results["cached_vs_uncached_head"] = results["head_cached_img_s"] / results["head_uncached_img_s"]
    results["loader_vs_full_step"] = results["loader_img_s"] / results["full_img_s"]
    results["bench_seconds"] = time.perf_counter() - t0
    results = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}

    out = args.out / f"train_{device.type}.json"
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"\n{results['device']}, torch {results['torch']}, batch {bs}, {args.image_size} px")
    for key in ("full_img_s", "head_uncached_img_s", "head_cached_img_s", "features_img_s", "loader_img_s"):
        print(f"  {key:<22} {results[key]:>10.1f} img/s")
    print(f"  cached / uncached head {results['cached_vs_uncached_head']:>10.1f} x")
    print(f"  loader / full step     {results['loader_vs_full_step']:>10.1f} x   (> 1: data loading keeps up)")
    print(f"wrote {out} in {results['bench_seconds']:.0f}s")


if __name__ == "__main__":
    main()
