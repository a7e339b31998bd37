"""Stage `prepare`: competition zip -> the lesson's folder layout, with a seeded validation split.

`python -m pipeline.prepare --zip data/raw/dogs-vs-cats-redux-kernels-edition.zip --out data/prepared
--metrics metrics/prepare.json` (run by `dvc repro prepare`). Writes:

    data/prepared/train/{cats,dogs}/        training images (Kaggle names kept: cat.123.jpg)
    data/prepared/valid/{cats,dogs}/        prepare.valid_per_class per class, never in train
    data/prepared/sample/{train,valid}/...  a few hard links into train and valid, for quick tries
    data/prepared/test/unknown/             the test images (123.jpg)
    data/prepared/rejected/{train,test}/    images that do not decode, with rejected.csv saying why
    data/prepared/manifest.csv              path,id,label,split: one row per image
    data/prepared/sample_submission.csv     Kaggle's list of the ids a submission must have

Zip members with absolute paths or `..` are refused (zip slip) before anything is extracted. Every
image is decoded once in worker processes; one that fails is moved aside, never crashes the run. The
same zip and params give byte-identical outputs. Everything is built in a temporary folder and renamed
into place, so an interrupted run leaves no half-prepared data.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import re
import shutil
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from pipeline.config import PrepareParams, load_params
from pipeline.data import atomic_write_text

log = logging.getLogger("prepare")
TRAIN_NAME = re.compile(r"^train/(cat|dog)\.(\d+)\.jpg$")
TEST_NAME = re.compile(r"^test/(\d+)\.jpg$")
CLASS_DIR = {"cat": "cats", "dog": "dogs"}


class PrepareError(RuntimeError):
    """The input cannot be prepared; the message says why and what to do."""


def check_member_names(zf: zipfile.ZipFile, where: str) -> None:
    """Refuse the whole zip if any member would land outside the extraction folder (zip slip)."""
    for name in zf.namelist():
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
            raise PrepareError(f"{where}: unsafe member name {name!r} (absolute or '..'): refusing to extract")


def is_junk(name: str) -> bool:
    """Folder entries and the metadata some zip tools add (__MACOSX/, .DS_Store)."""
    return name.endswith("/") or name.startswith("__MACOSX/") or PurePosixPath(name).name.startswith(".")


def extract_images(zip_path: Path, pattern: re.Pattern, dest: Path) -> list[tuple[str, re.Match]]:
    """Extract the members of an inner zip that match `pattern` into flat folder `dest`."""
    dest.mkdir(parents=True)
    found = []
    with zipfile.ZipFile(zip_path) as zf:
        check_member_names(zf, zip_path.name)
        for info in zf.infolist():
            if is_junk(info.filename):
                continue
            match = pattern.match(info.filename)
            if match is None:
                raise PrepareError(f"{zip_path.name}: unexpected member {info.filename!r} (not Kaggle's naming)")
            name = PurePosixPath(info.filename).name
            with zf.open(info) as src, open(dest / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            found.append((name, match))
    return found


def check_image(path: Path, max_pixels: int) -> str | None:
    """None if the image decodes completely, else why not. Runs in a worker process."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    return f"too large: {img.width}x{img.height} pixels > prepare.max_pixels"
                # a truncated JPEG opens fine and fails only when decoded; a reduced-scale (draft)
                # decode still reads every byte, at a fraction of the cost
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{e.__class__.__name__}: {e}"
    return None


def split_train(ids: dict[str, list[int]], params: PrepareParams) -> dict[str, dict[str, list[int]]]:
    """{class: {"train": ids, "valid": ids, "sample/train": ids, "sample/valid": ids}}, seeded."""
    rng = random.Random(params.seed)
    splits = {}
    for label in sorted(ids):
        pool = sorted(ids[label])
        need = params.valid_per_class + params.sample_train_per_class
        if len(pool) < need + 1:
            raise PrepareError(
                f"only {len(pool)} readable {label} images: prepare.valid_per_class="
                f"{params.valid_per_class} leaves too few for training; lower it in params.yaml"
            )
        rng.shuffle(pool)
        valid, train = sorted(pool[: params.valid_per_class]), sorted(pool[params.valid_per_class :])
        splits[label] = {
            "train": train,
            "valid": valid,
            "sample/train": sorted(rng.sample(train, params.sample_train_per_class)),
            "sample/valid": sorted(rng.sample(valid, min(params.sample_valid_per_class, len(valid)))),
        }
    return splits


def prepare(zip_path: Path, out: Path, params: PrepareParams) -> dict:
    """Build `out` from the competition zip; returns the metrics."""
    work = out.parent / f".{out.name}.tmp"
    if work.exists():
        shutil.rmtree(work)
    stage = work / ".extract"
    stage.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        check_member_names(zf, zip_path.name)
        for member in ("train.zip", "test.zip", "sample_submission.csv"):
            if member not in zf.namelist():
                raise PrepareError(f"{zip_path} lacks {member}: run 'dvc repro fetch' again")
            with zf.open(member) as src, open(stage / member, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    train = extract_images(stage / "train.zip", TRAIN_NAME, stage / "train")
    test = extract_images(stage / "test.zip", TEST_NAME, stage / "test")

    # decode-check every image in parallel
    files = [stage / "train" / n for n, _ in train] + [stage / "test" / n for n, _ in test]
    workers = params.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        errors = list(
            tqdm(
                pool.map(check_image, files, [params.max_pixels] * len(files), chunksize=64),
                total=len(files),
                desc="decode check",
                mininterval=2,
            )
        )
    bad = {f.name: e for f, e in zip(files, errors, strict=True) if e is not None}

    rows, rejected = [], []

    def place(src: Path, rel: str, id_: int, label: str, split: str) -> None:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, work / rel)  # a move on the same disk, not a copy
        rows.append((rel, id_, label, split))

    ids: dict[str, list[int]] = {"cat": [], "dog": []}
    for name, match in train:
        if name in bad:
            rejected.append((f"rejected/train/{name}", bad[name]))
            place(stage / "train" / name, f"rejected/train/{name}", int(match[2]), match[1], "rejected")
        else:
            ids[match[1]].append(int(match[2]))
    splits = split_train(ids, params)
    for label, parts in splits.items():
        for split in ("train", "valid"):
            for i in parts[split]:
                name = f"{label}.{i}.jpg"
                place(stage / "train" / name, f"{split}/{CLASS_DIR[label]}/{name}", i, label, split)
        for split in ("sample/train", "sample/valid"):
            source_split = split.split("/")[1]
            for i in parts[split]:
                rel = f"{split}/{CLASS_DIR[label]}/{label}.{i}.jpg"
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(work / source_split / CLASS_DIR[label] / f"{label}.{i}.jpg", work / rel)
                rows.append((rel, i, label, split))
    for name, match in test:
        where = f"rejected/test/{name}" if name in bad else f"test/unknown/{name}"
        if name in bad:
            rejected.append((where, bad[name]))
        place(stage / "test" / name, where, int(match[1]), "", "rejected" if name in bad else "test")
    os.rename(stage / "sample_submission.csv", work / "sample_submission.csv")
    shutil.rmtree(stage)

    rows.sort()
    with open(work / "manifest.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("path", "id", "label", "split"), *rows])
    with open(work / "rejected.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("path", "reason"), *sorted(rejected)])
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)

    counts: dict[str, dict[str, int]] = {}
    for _, _, label, split in rows:
        counts.setdefault(split, {}).setdefault(label or "unknown", 0)
        counts[split][label or "unknown"] += 1
    return {
        "counts": dict(sorted(counts.items())),
        "rejected": [{"path": p, "reason": r} for p, r in sorted(rejected)],
        "n_rejected": len(rejected),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the lesson's folder layout.")
    parser.add_argument("--zip", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_params(PrepareParams, "prepare", args.params)
    if not args.zip.exists():
        raise SystemExit(f"prepare failed: {args.zip} not found: run 'dvc repro fetch' first")
    try:
        metrics = prepare(args.zip, args.out, params)
    except (PrepareError, zipfile.BadZipFile) as e:
        raise SystemExit(f"prepare failed: {e}") from None
    atomic_write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    for r in metrics["rejected"]:
        log.warning("rejected %s: %s", r["path"], r["reason"])
    log.info("prepared %s: %s", args.out, json.dumps(metrics["counts"]))


if __name__ == "__main__":
    main()
