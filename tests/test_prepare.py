"""prepare: split counts, no overlap, zip slip, zip bombs (overlapping entries, real byte counts), corrupt images and
images the service refuses quarantined, one-line errors that say what is wrong, determinism."""

import csv
import dataclasses
import hashlib
import io
import random
import struct
import subprocess
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

import pipeline.safe_zip as safe_zip
import pipeline.stages.prepare as prepare_module
from pipeline.data import ImageError, load_image
from pipeline.stages.prepare import PrepareError, prepare
from tests.conftest import BIN, ROOT, tiny_prepare, tool_env


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def rebuild(
    src: Path, dest: Path, train: dict | None = None, test: dict | None = None, again=(), sample: bytes | None = None
) -> Path:
    """A copy of competition zip `src` whose inner zips get members added or replaced (deflated, as Kaggle's),
    `again` (inner zip, name, bytes) members added once more under a name that may be there already, and
    `sample` as its sample_submission.csv."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    if sample is not None:
        members["sample_submission.csv"] = sample
    for name, changes in (("train.zip", train), ("test.zip", test)):
        repeats = [(n, data) for inner, n, data in again if inner == name]
        if not changes and not repeats:
            continue
        with zipfile.ZipFile(io.BytesIO(members[name])) as zf:
            files = {n: zf.read(n) for n in zf.namelist()}
        files.update(changes or {})
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for n, data in [*files.items(), *repeats]:
                zf.writestr(n, data)
        members[name] = buf.getvalue()
    with zipfile.ZipFile(dest, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    return dest


def test_split_counts_and_layout(demo_zip, tmp_path):
    out = tmp_path / "prepared"
    metrics = prepare(demo_zip, out, tiny_prepare())
    assert metrics["counts"] == {
        "sample/train": {"cat": 3, "dog": 3},
        "sample/valid": {"cat": 2, "dog": 2},
        "test": {"unknown": 10},
        "train": {"cat": 15, "dog": 15},
        "valid": {"cat": 5, "dog": 5},
    }
    assert metrics["n_rejected"] == 0
    rows = read_manifest(out)
    for row in rows:  # ids and labels parsed from Kaggle's names, paths relative and real
        assert (out / row["path"]).is_file()
        name = Path(row["path"]).name
        if row["split"] == "test":
            assert name == f"{row['id']}.jpg" and row["label"] == "" and row["path"].startswith("test/unknown/")
        else:
            assert name == f"{row['label']}.{row['id']}.jpg"
            assert f"/{row['label']}s/" in row["path"]
    by_split = lambda s: {r["path"].split("/")[-1] for r in rows if r["split"] == s}  # noqa: E731
    assert not by_split("train") & by_split("valid")
    assert by_split("train") | by_split("valid") == {f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(20)}
    assert by_split("sample/train") <= by_split("train") and by_split("sample/valid") <= by_split("valid")
    # samples are hard links, not copies
    some = next(r for r in rows if r["split"] == "sample/train")
    assert (out / some["path"]).stat().st_nlink == 2
    assert (out / "sample_submission.csv").read_text().startswith("id,label\n")


def test_same_seed_same_bytes_other_seed_other_split(demo_zip, tmp_path):
    def tree_digest(out: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(out.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(out)).encode() + p.read_bytes())
        return h.hexdigest()

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert prepare(demo_zip, a, tiny_prepare()) == prepare(demo_zip, b, tiny_prepare())
    assert tree_digest(a) == tree_digest(b)
    prepare(demo_zip, c, tiny_prepare(seed=2))
    valid = lambda out: {r["path"] for r in read_manifest(out) if r["split"] == "valid"}  # noqa: E731
    assert valid(a) != valid(c)


def test_rerun_replaces_previous_output(demo_zip, tmp_path):
    out = tmp_path / "prepared"
    prepare(demo_zip, out, tiny_prepare(valid_per_class=8))
    prepare(demo_zip, out, tiny_prepare(valid_per_class=5))
    assert len(list((out / "valid" / "cats").iterdir())) == 5
    assert not (tmp_path / ".prepared.tmp").exists()


@pytest.mark.parametrize("evil", ["../evil.jpg", "/tmp/evil-abs.jpg", "train/../../evil.jpg", "C:/evil.jpg"])
def test_zip_slip_is_refused_before_extracting(demo_zip, tmp_path, evil):
    bad = rebuild(demo_zip, tmp_path / "bad.zip", train={evil: b"gotcha"})
    out = tmp_path / "work" / "prepared"
    out.parent.mkdir()
    with pytest.raises(PrepareError, match="unsafe member name"):
        prepare(bad, out, tiny_prepare())
    assert not out.exists()
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "work" / "evil.jpg").exists()
    assert not Path("/tmp/evil-abs.jpg").exists()


def jpeg(size=(60, 50)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def test_corrupt_images_are_quarantined_and_reported(demo_zip, tmp_path):
    whole = jpeg((200, 150))
    truncated = whole[: len(whole) * 2 // 3]
    Image.open(io.BytesIO(truncated))  # opens fine: only decoding finds the damage
    bad = rebuild(
        demo_zip,
        tmp_path / "bad.zip",
        train={
            "train/cat.3.jpg": truncated,
            "train/dog.0.jpg": b"not a jpeg at all",
            "train/dog.20.jpg": jpeg(size=(1200, 1000)),
        },  # over max_pixels: a "bomb"
        test={"test/2.jpg": truncated},
    )
    out = tmp_path / "prepared"
    metrics = prepare(bad, out, tiny_prepare())
    rejected = {r["path"]: r["reason"] for r in metrics["rejected"]}
    assert set(rejected) == {
        "rejected/train/cat.3.jpg",
        "rejected/train/dog.0.jpg",
        "rejected/train/dog.20.jpg",
        "rejected/test/2.jpg",
    }
    assert "truncated" in rejected["rejected/train/cat.3.jpg"]
    assert "too large" in rejected["rejected/train/dog.20.jpg"]
    for path in rejected:
        assert (out / path).is_file()  # moved aside, nothing lost
    # the split still has its counts, from the readable images
    assert metrics["counts"]["valid"] == {"cat": 5, "dog": 5}
    assert metrics["counts"]["train"] == {"cat": 14, "dog": 14}
    assert metrics["counts"]["test"] == {"unknown": 9}
    with open(out / "rejected.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_valid_fraction_takes_more_when_the_class_is_large(demo_zip, tmp_path):
    """make offline's split: at least valid_per_class a class, and valid_fraction of it when that is more."""
    assert tiny_prepare(valid_per_class=250, valid_fraction=0.1).valid_size(1_500) == 250  # the 4k kit: as before
    assert tiny_prepare(valid_per_class=250, valid_fraction=0.1).valid_size(10_000) == 1000  # the 22k kit
    metrics = prepare(demo_zip, tmp_path / "prepared", tiny_prepare(valid_per_class=2, valid_fraction=0.25))
    assert metrics["counts"]["valid"] == {"cat": 5, "dog": 5} and metrics["counts"]["train"] == {"cat": 15, "dog": 15}


def test_too_few_images_for_the_split_is_a_clear_error(demo_zip, tmp_path):
    with pytest.raises(PrepareError, match="lower it in params.yaml"):
        prepare(demo_zip, tmp_path / "prepared", tiny_prepare(valid_per_class=19))


def test_unexpected_member_is_an_error(demo_zip, tmp_path):
    bad = rebuild(demo_zip, tmp_path / "bad.zip", train={"train/horse.1.jpg": jpeg()})
    with pytest.raises(PrepareError, match="unexpected member 'train/horse.1.jpg'"):
        prepare(bad, tmp_path / "prepared", tiny_prepare())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"test": {"test/999.jpg": bytes(65 << 20)}}, r"test.zip: member 'test/999.jpg' unpacks to 65 MiB"),
        ({"train": {"train/cat.999.jpg": bytes(2 << 20)}}, r"\(\d+x its compressed size; limits 64 MiB, 100x\)"),
        ({"train": {"train/cat.01.jpg": b"x"}}, r"'train/cat.01.jpg' and 'train/cat.1.jpg' are the same image id"),
        ({"again": [("test.zip", "test/1.jpg", b"x")]}, r"'test/1.jpg' and 'test/1.jpg' are the same image id"),
        ({"sample": b""}, r"sample_submission.csv is not a CSV file \(EmptyDataError"),
        ({"sample": bytes(range(256)) * 4}, r"sample_submission.csv is not"),
        ({"sample": b"id,label\n"}, r"is not Kaggle's sample submission"),
    ],
)
def test_zip_bombs_duplicate_ids_and_bad_sample_submissions_are_refused(demo_zip, tmp_path, changes, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name": the point of one case
        bad = rebuild(demo_zip, tmp_path / "bad.zip", **changes)
    out = tmp_path / "work" / "prepared"
    out.parent.mkdir()
    with pytest.raises(PrepareError, match=message):
        prepare(bad, out, tiny_prepare())
    assert sorted(out.parent.iterdir()) == []  # nothing extracted is left: no prepared folder, no .prepared.tmp


# --- hardening (issue 24): overlapping-entries zip bombs, real byte counts, strips, misleading messages ----------


def overlapping_zip(names: list[str], size: int = 2 << 20) -> bytes:
    """A zip bomb of overlapping entries (D. Fifield, "A better zip bomb"): one deflated kernel of `size` bytes at the
    end, and before it each member's local header followed by a stored deflate block that quotes the next member's
    header. Member i's compressed data are therefore member i+1's header and data: every member unpacks to about
    `size` bytes, each header is honest (sizes, CRC, a ratio of ~56x, under the limits) and zipfile reads them all."""
    rng = random.Random(0)
    kernel = b"".join(rng.randbytes(256) + bytes(16 << 10) for _ in range(size // (16 << 10)))  # ~56x compressible
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = deflate.compress(kernel) + deflate.flush()
    headers = [b""] * len(names)
    usize, csize, crc, tail = len(kernel), len(packed), zlib.crc32(kernel), b""  # the last member: the kernel alone
    entries = [None] * len(names)
    for i in reversed(range(len(names))):
        name = names[i].encode()
        headers[i] = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, csize, usize, len(name), 0) + name
        entries[i] = (name, crc, csize, usize)
        if i:  # member i-1 = a stored block quoting header i, then member i's data
            tail = headers[i] + tail
            usize, csize = len(tail) + len(kernel), 5 + len(headers[i]) + csize
            crc = zlib.crc32(kernel, zlib.crc32(tail))
    body, offsets = b"", []
    for i, header in enumerate(headers):
        offsets.append(len(body))
        quote = headers[i + 1] if i + 1 < len(headers) else b""
        body += header + (struct.pack("<BHH", 0, len(quote), 0xFFFF ^ len(quote)) if quote else b"")
    body += packed
    directory = b"".join(
        struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, csize, usize, len(name), 0, 0, 0, 0, 0, off
        )
        + name
        for (name, crc, csize, usize), off in zip(entries, offsets, strict=True)
    )
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(names), len(names), len(directory), len(body), 0)
    return body + directory + end


def outer_zip(src: Path, dest: Path, replace: dict | None = None, extra=()) -> Path:
    """A copy of competition zip `src` with members replaced (`replace`: name -> bytes) and `extra` (name, bytes)
    members added after them, names given twice included."""
    with zipfile.ZipFile(src) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name": the point of some cases
        with zipfile.ZipFile(dest, "w") as zf:
            for n, data in [*((n, (replace or {}).get(n, data)) for n, data in members), *extra]:
                zf.writestr(n, data)
    return dest


def run_prepare(zip_path: Path, out: Path, params: Path) -> subprocess.CompletedProcess:
    """The real CLI, as `dvc repro prepare` runs it."""
    cmd = [str(BIN / "python"), "-m", "pipeline.stages.prepare", "--zip", str(zip_path), "--out", str(out)]
    cmd += ["--metrics", str(out.parent / "prepare.json"), "--params", str(params)]
    return subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["train.zip", "competition zip"])
def test_overlapping_entries_zip_bomb_is_refused_before_extracting(demo_zip, tmp_path, where):
    names = [f"train/cat.{1000 + i}.jpg" for i in range(16)]  # 16 members of ~2 MiB from one 37 KB kernel
    if where == "train.zip":
        bomb = outer_zip(demo_zip, tmp_path / "bomb.zip", replace={"train.zip": overlapping_zip(names)})
    else:
        (tmp_path / "bomb.zip").write_bytes(overlapping_zip(["train.zip", "test.zip", "sample_submission.csv"]))
        bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(io.BytesIO(overlapping_zip(names))) as zf:  # a real bomb: zipfile unpacks every member
        assert sum(len(zf.read(n)) for n in names) > 16 * 2_000_000 > 50 * len(zf.fp.getvalue())
    out = tmp_path / "work" / "prepared"
    out.parent.mkdir()
    with pytest.raises(PrepareError, match=r"members '.+' and '.+' overlap") as err:
        prepare(bomb, out, tiny_prepare())
    assert "\n" not in str(err.value) and "Download" in str(err.value)
    assert sorted(out.parent.iterdir()) == []


NOISE = random.Random(1).randbytes(4 << 20)  # incompressible


@pytest.mark.parametrize(
    "kind, changes, message",
    [  # limits lowered to (3 MiB a member, 100x, 5 MiB in all) and the header checks switched off
        ("inner zip", {"train/cat.999.jpg": NOISE}, r"zip: stopped extracting 'train/cat.999.jpg' as it passed 3 MiB"),
        ("inner zip", {f"train/cat.{i}.jpg": NOISE[i:][: 2 << 20] for i in (7, 8, 9)},
         r"train.zip: stopped extracting 'train/cat.9.jpg' as the zip passed 5 MiB in all"),
        ("inner zip", {"train/cat.999.jpg": bytes(2 << 20)}, r"'train/cat.999.jpg' as it passed 100x its compressed"),
        ("competition zip", {"test.zip": NOISE}, r"bad.zip: stopped extracting 'test.zip' as it passed 3 MiB"),
    ],
    ids=["member", "total", "ratio", "outer member"],
)  # fmt: skip
def test_extraction_counts_the_bytes_it_really_writes(demo_zip, tmp_path, monkeypatch, kind, changes, message):
    """The second line of defence: were the headers' claims wrong (here the header checks are switched off),
    extraction stops as soon as the bytes really written pass a limit, and writes nothing past it."""
    for module in (prepare_module, safe_zip):  # the stage checks the outer zip, safe_zip the inner ones
        monkeypatch.setattr(module, "check_sizes", lambda *args: None)
    monkeypatch.setitem(safe_zip.SIZE_LIMITS, kind, (3 << 20, 100, 5 << 20))
    if kind == "inner zip":
        bad = rebuild(demo_zip, tmp_path / "bad.zip", train=changes)
    else:
        bad = outer_zip(demo_zip, tmp_path / "bad.zip", replace=changes)
    sizes = {}  # file name -> bytes written

    class Measured:  # a file prepare writes, recording how large it grows
        def __init__(self, *args, **kwargs):
            self.file = open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, name):
            return getattr(self.file, name)

        def write(self, data):
            sizes[Path(self.file.name).name] = self.file.tell() + len(data)
            return self.file.write(data)

    for module in (prepare_module, safe_zip):
        monkeypatch.setattr(module, "open", Measured, raising=False)
    out = tmp_path / "work" / "prepared"
    out.parent.mkdir()
    with pytest.raises(PrepareError, match=message) as err:
        prepare(bad, out, tiny_prepare())
    assert "\n" not in str(err.value) and "Download" in str(err.value)
    members = [size for name, size in sizes.items() if name.endswith(".jpg") == (kind == "inner zip")]
    assert max(members) <= 3 << 20 and sum(members) <= 5 << 20  # nothing written past a limit
    assert sorted(out.parent.iterdir()) == []


def test_train_zip_given_twice_is_refused(demo_zip, tmp_path):
    """zipfile keeps the last of two members with one name: prepare would use one of them silently."""
    with zipfile.ZipFile(demo_zip) as zf:
        other = zf.read("train.zip")
    bad = outer_zip(demo_zip, tmp_path / "bad.zip", extra=[("train.zip", other)])
    with pytest.raises(PrepareError, match=r"bad.zip: 'train.zip' is in it 2 times") as err:
        prepare(bad, tmp_path / "prepared", tiny_prepare())
    assert "\n" not in str(err.value) and "Download" in str(err.value)


def without(src: Path, dest: Path, prefix: str) -> Path:
    """A copy of competition zip `src` whose train.zip lacks the members whose names start with `prefix`."""
    with zipfile.ZipFile(src) as zf, zipfile.ZipFile(io.BytesIO(zf.read("train.zip"))) as inner:
        kept = {n: inner.read(n) for n in inner.namelist() if not n.startswith(prefix)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in kept.items():
            zf.writestr(n, data)
    return outer_zip(src, dest, replace={"train.zip": buf.getvalue()})


@pytest.mark.parametrize(
    "case, message",
    [
        ("no dogs", r"train.zip holds 20 cat photos and no dog photo \(dog.<id>.jpg\): both classes are needed"),
        (
            "unreadable dogs",
            r"none of the 20 dog photos in train.zip can be used \(e.g. dog.0.jpg: UnidentifiedImageError",
        ),
    ],
    ids=["no dogs", "unreadable dogs"],
)
def test_a_missing_class_is_named_not_blamed_on_valid_per_class(demo_zip, tmp_path, case, message):
    if case == "no dogs":
        bad = without(demo_zip, tmp_path / "bad.zip", "train/dog.")
    else:
        bad = rebuild(demo_zip, tmp_path / "bad.zip", train={f"train/dog.{i}.jpg": b"junk" for i in range(20)})
    with pytest.raises(PrepareError, match=message) as err:
        prepare(bad, tmp_path / "prepared", tiny_prepare())
    assert "valid_per_class" not in str(err.value) and "\n" not in str(err.value)


def strip(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


def test_images_the_service_refuses_are_quarantined_before_decoding(demo_zip, tmp_path):
    """prepare keeps exactly what the service's load_image accepts: a 1x20,000 strip (5 KB, 20,000 pixels) would
    take seconds and GBs to resize. The size comes from the header: a truncated strip is refused as a strip."""
    images = {
        "train/cat.990.jpg": strip((1, 20000)),
        "train/cat.991.jpg": strip((20000, 1)),
        "train/cat.992.jpg": strip((2, 101)),  # just over MAX_ASPECT
        "train/cat.993.jpg": strip((2, 100)),  # just within it
        "train/cat.994.jpg": strip((1200, 1000)),  # over max_pixels
        "train/cat.995.jpg": strip((1, 20000))[:3000],  # truncated
    }
    bad = rebuild(demo_zip, tmp_path / "bad.zip", train=images, test={"test/990.jpg": strip((3000, 40))})
    out = tmp_path / "prepared"
    params = tiny_prepare()
    metrics = prepare(bad, out, params)
    rejected = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in metrics["rejected"]}
    assert sorted(rejected) == ["990.jpg", "cat.990.jpg", "cat.991.jpg", "cat.992.jpg", "cat.994.jpg", "cat.995.jpg"]
    assert all("strip, not a photo" in rejected[n] for n in ("990.jpg", "cat.990.jpg", "cat.991.jpg", "cat.995.jpg"))
    assert "1x20000 pixels" in rejected["cat.990.jpg"] and "prepare.max_pixels" in rejected["cat.994.jpg"]
    for name, data in [*images.items(), ("test/990.jpg", strip((3000, 40)))]:
        try:  # the service's own check, with prepare's pixel limit
            load_image(data, params.max_pixels)
            served = True
        except ImageError:
            served = False
        assert served == (name.rsplit("/", 1)[1] not in rejected), name
    with open(out / "rejected.csv") as f:
        assert {Path(r["path"]).name for r in csv.DictReader(f)} == set(rejected)
    assert all((out / r["path"]).is_file() for r in metrics["rejected"])  # moved aside, nothing lost


def test_prepare_accepts_no_more_pixels_than_the_service():
    """The pixel limit lives in two sections (prepare runs without the serve section): prepare's may not be looser."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["prepare"]["max_pixels"] <= params["serve"]["max_pixels"]


def test_messages_name_no_deleted_temporary_path(demo_zip, tmp_path):
    """Reasons and errors name the member (cat.3.jpg, sample_submission.csv), not the extraction folder that is
    gone by the time anyone reads them."""
    bad = rebuild(demo_zip, tmp_path / "bad.zip", train={"train/dog.0.jpg": b"not a jpeg at all"})
    metrics = prepare(bad, tmp_path / "prepared", tiny_prepare())
    (reason,) = [r["reason"] for r in metrics["rejected"]]
    assert reason == "UnidentifiedImageError: cannot identify image file 'dog.0.jpg'"
    bad = rebuild(demo_zip, tmp_path / "bad2.zip", sample=b"\xcd\xff not utf-8")
    with pytest.raises(PrepareError, match="sample_submission.csv is not a CSV file") as err:
        prepare(bad, tmp_path / "prepared2", tiny_prepare())
    assert ".tmp" not in str(err.value) and ".extract" not in str(err.value)
    assert "dvc repro prepare" not in str(err.value)  # the fix is a new download, not a rerun


@pytest.mark.parametrize("case", ["bomb", "train.zip twice", "no dogs"])
def test_the_cli_refuses_in_one_line_and_keeps_the_previous_output(demo_zip, tmp_path, case):
    out = tmp_path / "prepared"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": dataclasses.asdict(tiny_prepare())}))
    assert run_prepare(demo_zip, out, params).returncode == 0
    before = (out / "manifest.csv").read_bytes()
    if case == "bomb":
        names = [f"train/dog.{1000 + i}.jpg" for i in range(4)]
        bad = outer_zip(demo_zip, tmp_path / "bad.zip", replace={"train.zip": overlapping_zip(names)})
    elif case == "train.zip twice":
        bad = outer_zip(demo_zip, tmp_path / "bad.zip", extra=[("train.zip", b"")])
    else:
        bad = without(demo_zip, tmp_path / "bad.zip", "train/dog.")
    done = run_prepare(bad, out, params)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.strip() and "decode check" not in x]  # tqdm's bar aside
    assert line.startswith("prepare failed: ") and str(tmp_path / ".prepared.tmp") not in line
    assert {"bomb": "overlap", "train.zip twice": "2 times", "no dogs": "no dog photo"}[case] in line
    assert (out / "manifest.csv").read_bytes() == before and not (tmp_path / ".prepared.tmp").exists()
