"""submit: validation before anything is sent, the message, and the real kaggle client with only
`requests.Session.send` (the network edge) replaced, as in test_fetch."""

import json
import subprocess

import pytest
import requests

from pipeline import submit
from pipeline.submit import SubmitError, git_commit, submission_message, submit_to_kaggle
from tests.test_fetch import (
    JSON,
    fake_kaggle,
    kaggle_home,  # noqa: F401 (a fixture: no credentials anywhere)
    response,
)

COMP = "dogs-vs-cats-redux-kernels-edition"
EVALUATE = {"accuracy": 0.9123, "log_loss": 0.31, "clip": 0.0125, "log_loss_clipped": 0.2567}


@pytest.fixture
def files(tmp_path):
    """A valid submission, its sample, and the metrics submit reads."""
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "sample_submission.csv").write_text("id,label\n1,0.5\n2,0.5\n3,0.5\n")
    (tmp_path / "submission.csv").write_text("id,label\n1,0.0125\n2,0.9875\n3,0.5\n")
    (tmp_path / "evaluate.json").write_text(json.dumps(EVALUATE))
    (tmp_path / "predict.json").write_text(json.dumps({"clip": 0.0125, "n": 3}))
    return tmp_path


def argv(files, *extra):
    return [
        "--submission", str(files / "submission.csv"), "--prepared", str(files / "prepared"),
        "--metrics", str(files / "evaluate.json"), "--predict-metrics", str(files / "predict.json"), *extra,
    ]  # fmt: skip


def kaggle(monkeypatch, upload_status=200):
    """The Kaggle API answered at the network edge: token introspection (fake_kaggle), the upload URL, the
    upload, the submission. Returns the requests sent."""

    def answer(req):
        if "StartSubmissionUpload" in req.url:
            body = {"token": "blob-token-1", "createUrl": "https://storage.googleapis.com/upload/sub?sig=1"}
            return response(req, 200, json.dumps(body).encode(), JSON)
        if req.url.startswith("https://storage.googleapis.com/upload/"):
            req.uploaded = req.body.read() if hasattr(req.body, "read") else req.body  # a file reader, closed later
            return response(req, upload_status, b"")
        if "CreateSubmission" in req.url:
            return response(req, 200, b'{"message": "Successfully submitted", "ref": 42}', JSON)
        raise AssertionError(f"unexpected request {req.method} {req.url}")

    return fake_kaggle(monkeypatch, answer)


def test_message_carries_commit_and_metrics():
    msg = submission_message("abc1234-dirty", EVALUATE, "tta on")
    assert msg == "abc1234-dirty valid acc=0.9123 logloss=0.2567 clip=0.0125 tta on"


def test_git_commit_says_dirty(tmp_path):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
    assert git_commit(tmp_path) == head.stdout.strip()
    (tmp_path / "f.txt").write_text("2")
    assert git_commit(tmp_path) == head.stdout.strip() + "-dirty"
    with pytest.raises(SubmitError, match="submit from the project's git checkout"):
        git_commit(tmp_path / "nowhere")


@pytest.mark.usefixtures("kaggle_home")
def test_the_upload_sends_the_file_and_the_message(files, monkeypatch):
    sent = kaggle(monkeypatch)
    answer = submit_to_kaggle(files / "submission.csv", "abc1234 valid acc=0.9", COMP)
    assert answer == "Successfully submitted (submission 42)"
    start = next(r for r in sent if "StartSubmissionUpload" in r.url)
    assert json.loads(start.body)["competitionName"] == COMP
    put = next(r for r in sent if r.method == "PUT")
    assert put.uploaded == (files / "submission.csv").read_bytes()
    create = json.loads(next(r for r in sent if "CreateSubmission" in r.url).body)
    assert create["submissionDescription"] == "abc1234 valid acc=0.9" and create["blobFileTokens"] == "blob-token-1"
    assert all(r.headers.get("Authorization") == "Bearer fake-token" for r in sent if "kaggle.com" in r.url)


@pytest.mark.usefixtures("kaggle_home")
def test_main_validates_then_submits(files, monkeypatch, caplog):
    sent = kaggle(monkeypatch)
    monkeypatch.setattr(submit, "git_commit", lambda: "abc1234")
    with caplog.at_level("INFO", logger="submit"):
        submit.main(argv(files, "--message", "first try"))
    create = json.loads(next(r for r in sent if "CreateSubmission" in r.url).body)
    assert create["submissionDescription"] == "abc1234 valid acc=0.9123 logloss=0.2567 clip=0.0125 first try"
    assert any("Successfully submitted" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("id,label\n1,0.0125\n2,0.9875\n", "missing ids: 3"),
        ("id,label\n1,0.0125\n2,0.9875\n3,0.5\n3,0.5\n", "duplicated ids: 3"),
        ("id,label\n1,0.0125\n2,\n3,0.5\n", "NaN"),
        ("id,label\n1,0.001\n2,0.9875\n3,0.5\n", r"outside \[0.0125, 0.9875\]"),
    ],
)
def test_an_invalid_file_is_never_sent(files, monkeypatch, content, problem):
    def no_network(self, req, **kwargs):
        raise AssertionError(f"nothing may be sent for an invalid file, got {req.url}")

    monkeypatch.setattr(requests.Session, "send", no_network)
    (files / "submission.csv").write_text(content)
    with pytest.raises(SystemExit, match=f"not a valid submission, not submitted: .*{problem}"):
        submit.main(argv(files))


@pytest.mark.usefixtures("kaggle_home")
def test_without_credentials_says_how_to_set_them(files, monkeypatch):
    def no_network(self, req, **kwargs):
        raise AssertionError(f"no request expected without credentials, got {req.url}")

    monkeypatch.setattr(requests.Session, "send", no_network)
    with pytest.raises(SubmitError) as e:
        submit_to_kaggle(files / "submission.csv", "m", COMP)
    assert "KAGGLE_API_TOKEN" in str(e.value) and "kaggle.json" in str(e.value)


@pytest.mark.usefixtures("kaggle_home")
def test_rules_not_accepted_403(files, monkeypatch):
    kaggle(monkeypatch)  # token fine ...
    original = requests.Session.send

    def forbidden(self, req, **kwargs):  # ... but the competition refuses the upload
        if "StartSubmissionUpload" in req.url:
            body = b'{"code": 403, "message": "You must accept this competition\'s rules before you can continue"}'
            return response(req, 403, body, JSON)
        return original(self, req, **kwargs)

    monkeypatch.setattr(requests.Session, "send", forbidden)
    with pytest.raises(SubmitError) as e:
        submit_to_kaggle(files / "submission.csv", "m", COMP)
    assert "accept the competition rules" in str(e.value) and f"{COMP}/rules" in str(e.value)
    assert "'make submit'" in str(e.value)


@pytest.mark.usefixtures("kaggle_home")
def test_a_failed_upload_is_an_error_not_a_success(files, monkeypatch):
    kaggle(monkeypatch, upload_status=400)  # the client returns a message instead of raising
    with pytest.raises(SubmitError, match="Kaggle did not accept the upload: Could not submit to competition"):
        submit_to_kaggle(files / "submission.csv", "m", COMP)


@pytest.mark.usefixtures("kaggle_home")
def test_offline(files, monkeypatch):
    kaggle(monkeypatch)
    original = requests.Session.send

    def offline(self, req, **kwargs):
        if "StartSubmissionUpload" in req.url:
            raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")
        return original(self, req, **kwargs)

    monkeypatch.setattr(requests.Session, "send", offline)
    with pytest.raises(SubmitError, match="offline"):
        submit_to_kaggle(files / "submission.csv", "m", COMP)
