"""fetch: local sources (a zip, a browser download's folder, places it refuses), a failed fetch that keeps the
previous output, and the Kaggle client's failure modes. The demo source's data is tested in tests/test_demo.py.

The Kaggle tests run the real kaggle client; only `requests.Session.send` (the network edge) is replaced.
"""

import io
import logging
import re
import zipfile
from pathlib import Path

import pytest
import requests

from pipeline.params.fetch import FetchParams
from pipeline.stages.fetch import FetchError, fetch
from tests.conftest import tiny_demo

COMP = "dogs-vs-cats-redux-kernels-edition"


def params(source: str, **demo) -> FetchParams:
    return FetchParams(source=source, competition=COMP, demo=tiny_demo(**demo))


def fetch_into(tmp_path: Path, p: FetchParams) -> Path:
    zip_path = tmp_path / "data" / "raw" / f"{COMP}.zip"
    fetch(p, zip_path, zip_path.parent / "demo_test_labels.csv", Path("downloads"))  # dvc.yaml's, from the root
    return zip_path


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
