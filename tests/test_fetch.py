"""fetch: the demo generator's layout, local sources, and the Kaggle client's failure modes.

The Kaggle tests run the real kaggle client; only `requests.Session.send` (the network edge) is replaced.
"""

import csv
import hashlib
import io
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pipeline.demo import build_demo, make_image
from pipeline.fetch import FetchError, fetch
from pipeline.params.fetch import FetchParams
from tests.conftest import tiny_demo

COMP = "dogs-vs-cats-redux-kernels-edition"


def params(source: str, **demo) -> FetchParams:
    return FetchParams(source=source, competition=COMP, demo=tiny_demo(**demo))


def fetch_into(tmp_path: Path, p: FetchParams) -> Path:
    zip_path = tmp_path / "data" / "raw" / f"{COMP}.zip"
    fetch(p, zip_path, zip_path.parent / "demo_test_labels.csv")
    return zip_path


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


def competition_zip(tmp_path: Path) -> Path:
    return fetch_into(tmp_path / "src", params("demo"))


def test_local_zip_source(tmp_path, caplog):
    src = competition_zip(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fetch"):
        out = fetch_into(tmp_path / "dst", params(str(src)))
    assert out.read_bytes() == src.read_bytes()
    assert "is outside downloads/, so DVC does not track it" in caplog.text  # keep it in downloads/


def test_local_folder_source(tmp_path):
    src = competition_zip(tmp_path)
    folder = tmp_path / "browser-download"
    with zipfile.ZipFile(src) as zf:
        zf.extractall(folder)
    out = fetch_into(tmp_path / "dst", params(str(folder)))
    with zipfile.ZipFile(out) as zf:
        assert zf.read("train.zip") == (folder / "train.zip").read_bytes()


def test_local_source_that_is_not_the_competition(tmp_path):
    wrong = tmp_path / "other.zip"
    with zipfile.ZipFile(wrong, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(FetchError, match="lacks sample_submission.csv, test.zip, train.zip"):
        fetch_into(tmp_path, params(str(wrong)))
    with pytest.raises(FetchError, match="neither 'kaggle', 'demo' nor an existing zip"):
        fetch_into(tmp_path, params(str(tmp_path / "nope")))


def test_a_source_inside_the_stage_output_is_refused_with_where_to_put_it(tmp_path):
    inside = fetch_into(tmp_path, params("demo"))  # data/raw/<competition>.zip: DVC would delete it first
    before = inside.read_bytes()
    for source in (inside, inside.parent, tmp_path / "data" / "raw" / ".." / "raw" / "gone.zip"):
        with pytest.raises(FetchError, match=r"inside .*raw/, this stage's own output.* Put the zip in downloads/"):
            fetch_into(tmp_path, params(str(source)))
    assert inside.read_bytes() == before  # refused before anything was touched
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    home = downloads / f"{COMP}.zip"
    home.write_bytes(before)
    assert fetch_into(tmp_path, params(str(home))).read_bytes() == before  # its documented home works


def test_failed_fetch_keeps_the_previous_output(tmp_path):
    good = fetch_into(tmp_path, params("demo"))
    before = good.read_bytes()
    with pytest.raises(FetchError):
        fetch_into(tmp_path, params(str(tmp_path / "nope")))
    assert good.read_bytes() == before


# --- Kaggle: the real client, with requests.Session.send replaced ----------------------------------

JSON = {"Content-Type": "application/json"}


def response(req, status, body=b"", headers=None, url=None):
    r = requests.Response()
    r.status_code, r.raw, r.request = status, io.BytesIO(body), req
    r.headers = requests.structures.CaseInsensitiveDict(headers or {})
    r.url = url or req.url
    r.reason = {401: "Unauthorized", 403: "Forbidden"}.get(status, "OK")
    return r


@pytest.fixture
def kaggle_home(tmp_path, monkeypatch):
    """No credentials anywhere: an empty HOME and config dir, no KAGGLE_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    from kaggle.api.kaggle_api_extended import KaggleApi

    # the client fixes its config path at import time: point it at the empty folder
    monkeypatch.setattr(KaggleApi, "config", str(home / ".kaggle" / "kaggle.json"))
    monkeypatch.setattr(KaggleApi, "config_dir", str(home / ".kaggle"))
    return home


def fake_kaggle(monkeypatch, download):
    """Token introspection succeeds; the download request is answered by `download(req)`."""
    monkeypatch.setenv("KAGGLE_API_TOKEN", "fake-token")
    sent = []

    def send(self, req, **kwargs):
        sent.append(req)
        if "IntrospectToken" in req.url:
            return response(req, 200, b'{"active": true, "username": "fastai-student"}', JSON)
        return download(req)

    monkeypatch.setattr(requests.Session, "send", send)
    return sent


def test_kaggle_without_credentials_says_how_to_set_them(kaggle_home, tmp_path, monkeypatch):
    def no_network(self, req, **kwargs):
        raise AssertionError(f"no request expected without credentials, got {req.url}")

    monkeypatch.setattr(requests.Session, "send", no_network)
    with pytest.raises(FetchError) as e:
        fetch_into(tmp_path, params("kaggle"))
    msg = str(e.value)
    assert "KAGGLE_API_TOKEN" in msg and "~/.kaggle/access_token" in msg and "kaggle.json" in msg
    assert f"make repro ZIP=downloads/{COMP}.zip" in msg and "set fetch.source: demo" not in msg  # no circle
    assert not (tmp_path / "data" / "raw").exists()


def test_kaggle_rules_not_accepted_403(kaggle_home, tmp_path, monkeypatch):
    body = b'{"code": 403, "message": "You must accept this competition\'s rules before you can continue"}'
    fake_kaggle(monkeypatch, lambda req: response(req, 403, body, JSON))
    with pytest.raises(FetchError) as e:
        fetch_into(tmp_path, params("kaggle"))
    assert "accept the competition rules" in str(e.value)
    assert f"https://www.kaggle.com/competitions/{COMP}/rules" in str(e.value)


def test_kaggle_bad_token_401(kaggle_home, tmp_path, monkeypatch):
    fake_kaggle(monkeypatch, lambda req: response(req, 401, b'{"code": 401, "message": "Unauthenticated"}', JSON))
    with pytest.raises(FetchError, match=r"rejected the credentials \(401"):
        fetch_into(tmp_path, params("kaggle"))


def test_kaggle_offline(kaggle_home, tmp_path, monkeypatch):
    def offline(req):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    fake_kaggle(monkeypatch, offline)
    with pytest.raises(FetchError) as e:
        fetch_into(tmp_path, params("kaggle"))
    assert "offline" in str(e.value) and "fetch.source" in str(e.value)


def test_kaggle_download_succeeds(kaggle_home, tmp_path, monkeypatch):
    payload = competition_zip(tmp_path).read_bytes()
    headers = {"Content-Type": "application/zip", "Content-Length": str(len(payload))}
    sent = fake_kaggle(
        monkeypatch,
        lambda req: response(req, 200, payload, headers, url=f"https://storage.googleapis.com/bucket/{COMP}.zip?sig=1"),
    )
    out = fetch_into(tmp_path / "dst", params("kaggle"))
    assert out.read_bytes() == payload
    assert any(re.search(r"DownloadDataFiles", r.url) for r in sent)
    assert all(r.headers["Authorization"] == "Bearer fake-token" for r in sent)
