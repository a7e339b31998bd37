"""Stage `prepare`: competition zip -> the lesson's folder layout, with a seeded validation split.

`python -m pipeline.prepare --zip data/raw/dogs-vs-cats-redux-kernels-edition.zip --out data/prepared
--metrics metrics/prepare.json` (run by `dvc repro prepare`). Writes:

    data/prepared/train/{cats,dogs}/        training images (Kaggle names kept: cat.123.jpg)
    data/prepared/valid/{cats,dogs}/        prepare.valid_per_class per class (or valid_fraction), never in train
    data/prepared/sample/{train,valid}/...  a few hard links into train and valid, for quick tries
    data/prepared/test/unknown/             the test images (123.jpg)
    data/prepared/rejected/{train,test}/    images that do not decode, with rejected.csv saying why
    data/prepared/manifest.csv              path,id,label,split: one row per image
    data/prepared/sample_submission.csv     Kaggle's list of the ids a submission must have

Zip members with absolute paths or `..` are refused (zip slip) before anything is extracted, and so are
zip bombs: a member larger than it could be, too compressed, or a total too large (`SIZE_LIMITS`, from
the zip's own headers, which `zipfile` holds the data to); a member name or an image id given twice
(`cat.1.jpg` and `cat.01.jpg` are the same id) and a `sample_submission.csv` that is not Kaggle's are
errors that say so. Every
image is decoded once in worker processes; one that fails is moved aside, never crashes the run. The
same zip and params give byte-identical outputs. Everything is built in a temporary folder and renamed
into place, so an interrupted run leaves no half-prepared data; a failed run removes it.
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

from pipeline.config import load_params, setup_logging
from pipeline.data import SubmissionError, read_sample_ids
from pipeline.files import atomic_folder, atomic_write_text
from pipeline.params.prepare import PrepareParams

log = logging.getLogger("prepare")
TRAIN_NAME = re.compile(r"^train/(cat|dog)\.(\d+)\.jpg$")
TEST_NAME = re.compile(r"^test/(\d+)\.jpg$")
CLASS_DIR = {"cat": "cats", "dog": "dogs"}
# zip-bomb limits, checked on the headers before extracting (Kaggle's zip: train.zip 543 MB, test.zip 271 MB,
# photos under 1 MB, JPEGs barely compress): (largest member, largest compression ratio, largest total)
SIZE_LIMITS = {
    "competition zip": (4 << 30, 100, 8 << 30),
    "inner zip": (64 << 20, 100, 8 << 30),
}
RATIO_FROM = 1 << 20  # members smaller than this may compress as much as they like (a CSV of ids does)


class PrepareError(RuntimeError):
    """The input cannot be prepared; the message says why and what to do."""


def check_member_names(zf: zipfile.ZipFile, where: str) -> None:
    """Refuse the whole zip if any member would land outside the extraction folder (zip slip)."""
    for name in zf.namelist():
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
            raise PrepareError(f"{where}: unsafe member name {name!r} (absolute or '..'): refusing to extract")


def check_sizes(zf: zipfile.ZipFile, where: str, kind: str) -> None:
    """Refuse a zip bomb before extracting: any member over the size or compression-ratio limit of `kind`,
    or more than the total. `zipfile` never yields more bytes than a member's header declares."""
    max_member, max_ratio, max_total = SIZE_LIMITS[kind]
    total = 0
    for info in zf.infolist():
        total += info.file_size
        ratio = info.file_size / max(1, info.compress_size)
        if info.file_size > max_member or (info.file_size > RATIO_FROM and ratio > max_ratio):
            raise PrepareError(
                f"{where}: member {info.filename!r} unpacks to {info.file_size / 2**20:.0f} MiB ({ratio:.0f}x its "
                f"compressed size; limits {max_member / 2**20:.0f} MiB, {max_ratio}x): a zip bomb or not the "
                "competition's data, refusing to extract. Download the zip again"
            )
    if total > max_total:
        raise PrepareError(
            f"{where}: unpacks to {total / 2**30:.1f} GiB, over the {max_total / 2**30:.0f} GiB limit: refusing to "
            "extract. Download the zip again"
        )


def is_junk(name: str) -> bool:
    """Folder entries and the metadata some zip tools add (__MACOSX/, .DS_Store)."""
    return name.endswith("/") or name.startswith("__MACOSX/") or PurePosixPath(name).name.startswith(".")


def extract_images(zip_path: Path, pattern: re.Pattern, dest: Path) -> list[tuple[str, re.Match]]:
    """Extract the members of an inner zip that match `pattern` into flat folder `dest`."""
    dest.mkdir(parents=True)
    found, seen = [], {}
    with zipfile.ZipFile(zip_path) as zf:
        check_member_names(zf, zip_path.name)
        check_sizes(zf, zip_path.name, "inner zip")
        for info in zf.infolist():
            if is_junk(info.filename):
                continue
            match = pattern.match(info.filename)
            if match is None:
                raise PrepareError(f"{zip_path.name}: unexpected member {info.filename!r} (not Kaggle's naming)")
            key = tuple(int(g) if g.isdigit() else g for g in match.groups())  # cat.01 and cat.1: one id
            if key in seen:
                raise PrepareError(
                    f"{zip_path.name}: {info.filename!r} and {seen[key]!r} are the same image id: the zip is "
                    "damaged or two downloads were merged. Download it again"
                )
            seen[key] = info.filename
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
        for member in ("train.zip", "test.zip", "sample_submission.csv"):
            if member not in zf.namelist():
                raise PrepareError(f"{zip_path} lacks {member}: run 'dvc repro fetch' again")
            with zf.open(member) as src, open(stage / member, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    try:
        read_sample_ids(stage / "sample_submission.csv")
    except SubmissionError as e:
        raise PrepareError(f"{zip_path}: {e}. Download the competition zip again") from None
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
