"""A competition zip read without trusting it: zip slip, zip bombs and overlapping entries refused before and while
extracting.

Not a stage: `prepare` (`python -m pipeline.stages.prepare`) extracts the competition zip and its inner train and
test zips with it. Each check reads the zip's own headers first (names, sizes, compression ratios, where each
member's data lies), then the bytes really written are counted against the same limits, so a header that lies is
caught too. Errors are `PrepareError`s that say what is wrong and what to do.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path, PurePosixPath

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
