"""Prepare at the competition's size: 25,000 training and 12,500 test images through `prepare`.

`python bench/prepare_bench.py` writes bench/results/prepare_cpu.json and prints the time. The zip is
built in a temporary folder with Kaggle's layout and names, from the 400 real photos in
../shared/data/real-photos-200px (each re-encoded once at a real Kaggle size, 300-500 px a side, JPEG
quality 90, then cycled); without that folder, from demo images of the same sizes. Then the real
`prepare` runs on it with the real run's split (1000 validation images per class), in a temporary folder under
the current one (the project's disk, as a real run uses).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.demo import make_image  # noqa: E402
from pipeline.params.fetch import DemoParams  # noqa: E402
from pipeline.params.prepare import PrepareParams  # noqa: E402
from pipeline.stages.prepare import prepare  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "real-photos-200px"


def source_jpegs(rng: np.random.Generator) -> tuple[list[bytes], str]:
    """A few hundred JPEGs at real Kaggle sizes: the shared real photos if present, else demo images."""
    out = []
    if PHOTOS.is_dir():
        for path in sorted(PHOTOS.glob("*.jpg")):
            w, h = (int(s) for s in rng.integers(300, 501, 2))
            buf = io.BytesIO()
            Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        return out, f"{len(out)} real photos from {PHOTOS}, re-encoded at 300-500 px"
    params = DemoParams(
        seed=0, train_per_class=0, test_count=0, min_side=300, max_side=500, mislabel_fraction=0.0, hard_fraction=0.1
    )
    out = [make_image(rng, ("cat", "dog")[i % 2], params)[0] for i in range(400)]
    return out, "400 demo images at 300-500 px (shared real photos not found)"


def build_zip(path: Path, jpegs: list[bytes], per_class: int, test: int) -> None:
    def inner(members) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members:
                zf.writestr(name, data)
        return buf.getvalue()

    train = [
        (f"train/{c}.{i}.jpg", jpegs[(2 * i + k) % len(jpegs)])
        for k, c in enumerate(("cat", "dog"))
        for i in range(per_class)
    ]
    tests = [(f"test/{i}.jpg", jpegs[i % len(jpegs)]) for i in range(1, test + 1)]
    sample = "id,label\n" + "".join(f"{i},0.5\n" for i in range(1, test + 1))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("train.zip", inner(train))
        zf.writestr("test.zip", inner(tests))
        zf.writestr("sample_submission.csv", sample)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=12_500)
    parser.add_argument("--test", type=int, default=12_500)
    parser.add_argument("--valid-per-class", type=int, default=1000, help="the real run's prepare.valid_per_class")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    jpegs, source = source_jpegs(np.random.default_rng(0))
    params = PrepareParams(
        seed=42,
        valid_per_class=args.valid_per_class,
        valid_fraction=0.0,
        sample_train_per_class=8,
        sample_valid_per_class=4,
        max_pixels=25_000_000,
        workers=0,
    )
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # the project's disk, as a real run uses
        zip_path = Path(tmp) / "competition.zip"
        build_zip(zip_path, jpegs, args.per_class, args.test)
        size = zip_path.stat().st_size
        t0 = time.perf_counter()
        metrics = prepare(zip_path, Path(tmp) / "prepared", params)
        seconds = time.perf_counter() - t0
    n = 2 * args.per_class + args.test
    results = {
        "images": n,
        "zip_mib": round(size / 2**20, 1),
        "seconds": round(seconds, 1),
        "images_per_second": round(n / seconds, 1),
        "cpu_cores": os.cpu_count(),
        "source": source,
        "counts": metrics["counts"],
        "rejected": metrics["n_rejected"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"prepared {n} images ({results['zip_mib']} MiB zip) in {seconds:.1f} s: "
        f"{results['images_per_second']:.0f} images/s on {os.cpu_count()} cores ({source})"
    )


if __name__ == "__main__":
    main()
