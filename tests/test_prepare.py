"""prepare: split counts, no overlap, zip slip, corrupt images quarantined, determinism."""

import csv
import hashlib
import io
import warnings
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.prepare import PrepareError, prepare
from tests.conftest import tiny_prepare


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
