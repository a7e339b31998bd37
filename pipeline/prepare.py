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
the zip's own headers), and members whose data overlap (the overlapping-entries bomb, whose headers are
honest); while extracting, the bytes really written are counted against the same limits. A member name
or an image id given twice (`cat.1.jpg` and `cat.01.jpg` are the same id), a class with no photo and a
`sample_submission.csv` that is not Kaggle's are errors that say so. Every image is checked once in
worker processes: one that does not decode, or that the service would refuse (over `max_pixels`, or a
strip longer than `MAX_ASPECT`:1, both read from its header), is moved aside with the reason, never
crashes the run. The same zip and params give byte-identical outputs. Everything is built in a temporary
folder and renamed into place, so an interrupted run leaves no half-prepared data; a failed run removes it.
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
import struct
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from pipeline.config import load_params, setup_logging
from pipeline.data import MAX_ASPECT, SubmissionError, read_sample_ids
from pipeline.files import atomic_folder, atomic_write_text
from pipeline.params.prepare import PrepareParams

log = logging.getLogger("prepare")
TRAIN_NAME = re.compile(r"^train/(cat|dog)\.(\d+)\.jpg$")
TEST_NAME = re.compile(r"^test/(\d+)\.jpg$")
CLASS_DIR = {"cat": "cats", "dog": "dogs"}
MEMBERS = ("train.zip", "test.zip", "sample_submission.csv")  # what prepare reads from the competition zip
# zip-bomb limits, checked on the headers before extracting and on the bytes written while extracting (Kaggle's
# zip: train.zip 543 MB, test.zip 271 MB, photos under 1 MB, JPEGs barely compress):
# (largest member, largest compression ratio, largest total)
SIZE_LIMITS = {
    "competition zip": (4 << 30, 100, 8 << 30),
    "inner zip": (64 << 20, 100, 8 << 30),
}
RATIO_FROM = 1 << 20  # members smaller than this may compress as much as they like (a CSV of ids does)
CHUNK = 1 << 20  # extraction copies this much at a time; the chunk that passes a limit is not written
LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip member's local file header, before its name and extra field


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
    or more than the total, as the headers declare them (`extract_member` counts what is really written)."""
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


def check_overlaps(zip_path: Path, zf: zipfile.ZipFile, where: str) -> None:
    """Refuse members whose stored data overlap: the overlapping-entries zip bomb points many entries, each with
    honest sizes within the limits, at one block of compressed data. A member spans its local header and its
    compressed data; in a sound zip no two spans share a byte."""
    spans = []
    with open(zip_path, "rb", buffering=0) as f:  # 30 bytes a member: Kaggle's train.zip has 25,000
        for info in zf.infolist():  # header_offset counts from the file's start, even after a prepended stub
            f.seek(info.header_offset)
            header = f.read(LOCAL_HEADER.size)
            if len(header) < LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise PrepareError(
                    f"{where}: member {info.filename!r} has no local header: the zip is damaged. Download it again"
                )
            name_length, extra_length = LOCAL_HEADER.unpack(header)[-2:]
            end = info.header_offset + LOCAL_HEADER.size + name_length + extra_length + info.compress_size
            spans.append((info.header_offset, end, info.filename))
    spans.sort()
    neighbours = zip(spans, spans[1:], strict=False)  # sorted by start: any overlap shows between neighbours
    for (_, end, first), (start, _, second) in neighbours:
        if start < end:
            raise PrepareError(
                f"{where}: members {first!r} and {second!r} overlap (their compressed data are shared): an "
                "overlapping-entries zip bomb or a damaged zip, refusing to extract. Download the zip again"
            )


def size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 1 << 30 else f"{n / 2**20:.0f} MiB"


def extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, written: int, where: str, kind: str) -> int:
    """Copy member `info` to file `dest`, counting the bytes really written against `kind`'s limits (`written`: the
    zip's bytes so far); returns the new count. The chunk that passes a limit is not written."""
    max_member, max_ratio, max_total = SIZE_LIMITS[kind]
    size = 0
    with zf.open(info) as src, open(dest, "wb") as dst:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > max_member:
                problem = f"it passed {size_text(max_member)}"
            elif size > RATIO_FROM and size > max_ratio * max(1, info.compress_size):
                problem = f"it passed {max_ratio}x its compressed size"
            elif written + size > max_total:
                problem = f"the zip passed {size_text(max_total)} in all"
            else:
                dst.write(chunk)
                continue
            raise PrepareError(
                f"{where}: stopped extracting {info.filename!r} as {problem} (its header says it unpacks to "
                f"{size_text(info.file_size)}): a zip bomb or not the competition's data. Download the zip again"
            )
    return written + size


def is_junk(name: str) -> bool:
    """Folder entries and the metadata some zip tools add (__MACOSX/, .DS_Store)."""
    return name.endswith("/") or name.startswith("__MACOSX/") or PurePosixPath(name).name.startswith(".")


def extract_images(zip_path: Path, pattern: re.Pattern, dest: Path) -> list[tuple[str, re.Match]]:
    """Extract the members of an inner zip that match `pattern` into flat folder `dest`."""
    dest.mkdir(parents=True)
    found, seen, written = [], {}, 0
    with zipfile.ZipFile(zip_path) as zf:
        check_member_names(zf, zip_path.name)
        check_sizes(zf, zip_path.name, "inner zip")
        check_overlaps(zip_path, zf, zip_path.name)
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
            written = extract_member(zf, info, dest / name, written, zip_path.name, "inner zip")
            found.append((name, match))
    return found


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
