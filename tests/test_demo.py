"""demo: the offline demo data, written as a user gets it (the fetch stage with `fetch.source: demo`). The zip
has Kaggle's exact layout, its images are real JPEGs of varied size and aspect, the same seed gives the same bytes
(another seed other bytes), and the generator mislabels the fraction it is asked to."""

import csv
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.demo import build_demo, make_image
from tests.conftest import tiny_demo
from tests.test_fetch import fetch_into, params


def inner(zip_path: Path, member: str) -> zipfile.ZipFile:
    with zipfile.ZipFile(zip_path) as zf:
        return zipfile.ZipFile(io.BytesIO(zf.read(member)))


def test_demo_zip_has_kaggles_exact_layout(tmp_path):
    zip_path = fetch_into(tmp_path, params("demo"))
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == ["sample_submission.csv", "test.zip", "train.zip"]
        sample = list(csv.reader(io.StringIO(zf.read("sample_submission.csv").decode())))
    train = inner(zip_path, "train.zip").namelist()
    assert sorted(train) == sorted([f"train/{c}.{i}.jpg" for c in ("cat", "dog") for i in range(20)])
    test = inner(zip_path, "test.zip").namelist()
    assert sorted(test) == sorted(f"test/{i}.jpg" for i in range(1, 11))
    assert sample[0] == ["id", "label"] and [r[0] for r in sample[1:]] == [str(i) for i in range(1, 11)]
    labels = (zip_path.parent / "demo_test_labels.csv").read_text().splitlines()
    assert labels[0] == "id,label" and len(labels) == 11
    assert {line.split(",")[1] for line in labels[1:]} == {"0", "1"}


def test_demo_images_are_real_jpegs_of_varied_size(tmp_path):
    zf = inner(fetch_into(tmp_path, params("demo")), "train.zip")
    sizes = set()
    for name in zf.namelist():
        img = Image.open(io.BytesIO(zf.read(name)))
        assert img.format == "JPEG" and img.mode == "RGB"
        img.load()
        assert 48 <= min(img.size) and max(img.size) <= 80
        sizes.add(img.size)
    assert len(sizes) > 20  # sizes and aspect ratios vary like photos
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.8 and max(aspects) > 1.25


def test_demo_is_deterministic_and_seeded(tmp_path):
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    a = fetch_into(tmp_path / "a", params("demo"))
    b = fetch_into(tmp_path / "b", params("demo"))
    c = fetch_into(tmp_path / "c", params("demo", seed=8))
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_demo_mislabels_a_fraction():
    # the generator reports the drawn class; with mislabel_fraction=1 every image shows the other class
    rng = np.random.default_rng(0)
    drawn = [make_image(rng, "cat", tiny_demo(mislabel_fraction=1.0))[1] for _ in range(3)]
    assert drawn == ["dog"] * 3
    members, labels = build_demo(tiny_demo(test_count=4))
    assert [i for i, _ in labels] == [1, 2, 3, 4]
