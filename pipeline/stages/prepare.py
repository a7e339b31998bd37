"""Stage `prepare`: competition zip -> the lesson's folder layout, with a seeded validation split.

`python -m pipeline.stages.prepare --zip data/raw/dogs-vs-cats-redux-kernels-edition.zip --out data/prepared
--metrics metrics/prepare.json` (run by `dvc repro prepare`). Writes `train/{cats,dogs}`, `valid/{cats,dogs}`
(`prepare.valid_per_class`, or `valid_fraction`), `sample/`, `test/unknown`, `rejected/` with `rejected.csv`,
`manifest.csv` and Kaggle's `sample_submission.csv`. The zip is read without trusting it (`pipeline.safe_zip`); an id
given twice, a class with no photo or a sample submission that is not Kaggle's is an error that says so; every image
is decode-checked once in worker processes, and one that does not decode or that the service would refuse is moved
aside with the reason. The same zip and params give byte-identical outputs, built in a temporary folder and renamed
into place (docs/pipeline.md).
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
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.config import load_params, setup_logging
from pipeline.data import MAX_ASPECT, SubmissionError, read_sample_ids
from pipeline.files import atomic_folder, atomic_write_text
from pipeline.params.prepare import PrepareParams
from pipeline.safe_zip import (
    PrepareError,
    check_member_names,
    check_overlaps,
    check_sizes,
    extract_images,
    extract_member,
)

log = logging.getLogger("prepare")
TRAIN_NAME = re.compile(r"^train/(cat|dog)\.(\d+)\.jpg$")
TEST_NAME = re.compile(r"^test/(\d+)\.jpg$")
CLASS_DIR = {"cat": "cats", "dog": "dogs"}
MEMBERS = ("train.zip", "test.zip", "sample_submission.csv")  # what prepare reads from the competition zip


def check_image(path: Path, max_pixels: int) -> str | None:
    """None if the image decodes completely and the service would take it, else why not. Runs in a worker
    process."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            with Image.open(path) as img:  # reads the header only: the size is known before any decoding
                width, height = img.size
                if width * height > max_pixels:
                    return f"too large: {width}x{height} pixels > prepare.max_pixels"
                # the service's limit (pipeline.data.load_image): resizing a 1x20,000 strip's short side to
                # 256 px would take seconds and GBs
                if max(width, height) > MAX_ASPECT * min(width, height):
                    return f"{width}x{height} pixels is a strip, not a photo (longer than {MAX_ASPECT}:1)"
                # a truncated JPEG opens fine and fails only when decoded; a reduced-scale (draft)
                # decode still reads every byte, at a fraction of the cost
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow names the file it was given: our extraction folder, gone when the reason is read
        return f"{e.__class__.__name__}: {e}".replace(str(path), path.name)
    return None


def check_classes(train: list[tuple[str, re.Match]], bad: dict[str, str]) -> None:
    """Refuse a train.zip with no readable photo of a class, naming the counts (no split could help)."""
    total = Counter(match[1] for _, match in train)
    held = " and ".join(
        f"{total[label]} {label} photos" if total[label] else f"no {label} photo" for label in CLASS_DIR
    )
    missing = [label for label in CLASS_DIR if not total[label]]
    if missing:
        names = ", ".join(f"{label}.<id>.jpg" for label in missing)
        raise PrepareError(
            f"train.zip holds {held} ({names}): both classes are needed. Download the competition zip again"
        )
    for label in CLASS_DIR:
        rejected = sorted((int(m[2]), n) for n, m in train if m[1] == label and n in bad)
        if len(rejected) == total[label]:
            name = rejected[0][1]
            raise PrepareError(
                f"none of the {total[label]} {label} photos in train.zip can be used (e.g. {name}: {bad[name]}): "
                "the zip is damaged. Download the competition zip again"
            )


def split_train(ids: dict[str, list[int]], params: PrepareParams) -> dict[str, dict[str, list[int]]]:
    """{class: {"train": ids, "valid": ids, "sample/train": ids, "sample/valid": ids}}, seeded."""
    rng = random.Random(params.seed)
    splits = {}
    for label in sorted(ids):
        pool = sorted(ids[label])
        n_valid = params.valid_size(len(pool))
        if len(pool) < n_valid + params.sample_train_per_class + 1:
            raise PrepareError(
                f"only {len(pool)} readable {label} images: prepare.valid_per_class={params.valid_per_class} "
                f"leaves too few for training ({n_valid} for validation, valid_fraction {params.valid_fraction}); "
                "lower it in params.yaml"
            )
        rng.shuffle(pool)
        valid, train = sorted(pool[:n_valid]), sorted(pool[n_valid:])
        splits[label] = {
            "train": train,
            "valid": valid,
            "sample/train": sorted(rng.sample(train, params.sample_train_per_class)),
            "sample/valid": sorted(rng.sample(valid, min(params.sample_valid_per_class, len(valid)))),
        }
    return splits


def prepare(zip_path: Path, out: Path, params: PrepareParams) -> dict:
    """Build `out` from the competition zip; returns the metrics."""
    with atomic_folder(out) as work:  # whatever stops it, no half-prepared folder is left behind
        return prepare_into(zip_path, work, params)


def prepare_into(zip_path: Path, work: Path, params: PrepareParams) -> dict:
    """Build the prepared folder in `work`; returns the metrics."""
    stage = work / ".extract"
    stage.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        check_member_names(zf, zip_path.name)
        check_sizes(zf, zip_path.name, "competition zip")
        check_overlaps(zip_path, zf, zip_path.name)
        counts, written = Counter(zf.namelist()), 0
        for member in MEMBERS:
            if not counts[member]:
                raise PrepareError(f"{zip_path} lacks {member}: run 'dvc repro fetch' again")
            if counts[member] > 1:  # zipfile would silently use the last
                raise PrepareError(
                    f"{zip_path}: {member!r} is in it {counts[member]} times: the zip is damaged or two downloads "
                    "were merged, and prepare will not guess which to use. Download the competition zip again"
                )
            written = extract_member(zf, zf.getinfo(member), stage / member, written, zip_path.name, "competition zip")
    try:
        read_sample_ids(stage / "sample_submission.csv")
    except SubmissionError as e:  # its message names our extraction folder and says to rerun prepare: neither helps
        reason = str(e).replace(str(stage / "sample_submission.csv"), "sample_submission.csv")
        reason = reason.removesuffix(": run 'dvc repro prepare'")
        raise PrepareError(f"{zip_path}: {reason}. Download the competition zip again") from None
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
    check_classes(train, bad)

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
    setup_logging()
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
