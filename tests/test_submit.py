"""submit: validation before anything is sent, the message, and the real kaggle client with only
`requests.Session.send` (the network edge) replaced, as in test_fetch."""

import json
import os
import shutil
import subprocess

import pytest
import requests

from pipeline.tools import submit
from pipeline.tools.submit import SubmitError, git_commit, submission_message, submit_to_kaggle
from tests.conftest import BIN, ROOT, tool_env
from tests.test_fetch import (
    JSON,
    fake_kaggle,
    kaggle_home,  # noqa: F401 (a fixture: no credentials anywhere)
    response,
)

COMP = "dogs-vs-cats-redux-kernels-edition"
BLEND = {
    "accuracy": 0.9123,
    "log_loss": 0.31,
    "log_loss_calibrated": 0.2567,
    "weights": {"lite0": 0.5, "lite1": 0.5, "vgg16": 0.0},  # a member the blend gave no weight is not in the message
    "calibration": "temperature",
    "temperature": 1.2345,
    "temperature_clip": 0.0125,
    "clip": 0.02,
}
PREDICT = {"clip": 0.0125, "temperature": 1.2345, "tta": True, "n": 3}


@pytest.fixture
def files(tmp_path):
    """A valid submission, its sample, and the metrics submit reads."""
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "sample_submission.csv").write_text("id,label\n1,0.5\n2,0.5\n3,0.5\n")
    (tmp_path / "submission.csv").write_text("id,label\n1,0.0125\n2,0.9875\n3,0.5\n")
    (tmp_path / "blend.json").write_text(json.dumps(BLEND))
    (tmp_path / "predict.json").write_text(json.dumps(PREDICT))
    return tmp_path


def argv(files, *extra):
    return [
        "--submission", str(files / "submission.csv"), "--prepared", str(files / "prepared"),
        "--metrics", str(files / "blend.json"), "--predict-metrics", str(files / "predict.json"), *extra,
    ]  # fmt: skip


def kaggle_answer(req, upload_status=200):
    """The Kaggle API's answers to a submission, after token introspection (fake_kaggle): the upload URL, the upload,
    the submission."""
    if "StartSubmissionUpload" in req.url:
        body = {"token": "blob-token-1", "createUrl": "https://storage.googleapis.com/upload/sub?sig=1"}
        return response(req, 200, json.dumps(body).encode(), JSON)
    if req.url.startswith("https://storage.googleapis.com/upload/"):
        req.uploaded = req.body.read() if hasattr(req.body, "read") else req.body  # a file reader, closed later
        return response(req, upload_status, b"")
    if "CreateSubmission" in req.url:
        return response(req, 200, b'{"message": "Successfully submitted", "ref": 42}', JSON)
    raise AssertionError(f"unexpected request {req.method} {req.url}")


def kaggle(monkeypatch, upload_status=200):
    """The Kaggle API answered at the network edge. Returns the requests sent."""
    return fake_kaggle(monkeypatch, lambda req: kaggle_answer(req, upload_status))


def test_message_carries_commit_and_metrics():
    msg = submission_message("abc1234-dirty", BLEND, PREDICT, "second try")
    assert msg == "abc1234-dirty lite0+lite1 valid acc=0.9123 logloss=0.2567 T=1.234 clip=0.0125 tta second try"
    clip_alone = {**BLEND, "weights": {"model": 1.0}, "calibration": "clip"}
    no_temperature = submission_message("abc1234", clip_alone, {"clip": 0.02, "tta": False})
    assert no_temperature == "abc1234 model valid acc=0.9123 logloss=0.2567 clip=0.0200"
    # predict.clip fixed to a number: the blend's calibrated loss is not the submission's; its raw loss is named so
    fixed = submission_message("abc1234", clip_alone, {"clip": 0.05, "tta": False})
    assert fixed == "abc1234 model valid acc=0.9123 logloss=0.3100 (uncalibrated) clip=0.0500"


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


def test_a_predict_record_that_is_not_predicts_is_refused_before_anything_is_sent(files, monkeypatch):
    def no_network(self, req, **kwargs):
        raise AssertionError(f"nothing may be sent, got {req.url}")

    monkeypatch.setattr(requests.Session, "send", no_network)
    for record, problem in (({"clip": 0.6, "tta": False}, "outside"), ({"tta": False}, "lacks 'clip'")):
        (files / "predict.json").write_text(json.dumps(record))
        with pytest.raises(SystemExit, match=f"predict.json: .*{problem}"):
            submit.main(argv(files))


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
    expected = "abc1234 lite0+lite1 valid acc=0.9123 logloss=0.2567 T=1.234 clip=0.0125 tta first try"
    assert create["submissionDescription"] == expected
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


# `make submit` runs pipeline.tools.submit in its own Python: this file, as its sitecustomize, puts the fake Kaggle edge
# there (requests.Session.send answered by kaggle_answer) and logs each request as a JSON line
SITECUSTOMIZE = """
import json, os, sys
sys.path.insert(0, {root!r})
import requests
from tests.test_fetch import JSON, response
from tests.test_submit import kaggle_answer

def send(self, req, **kwargs):
    if "IntrospectToken" in req.url:
        r = response(req, 200, b'{{"active": true, "username": "fastai-student"}}', JSON)
    else:
        r = kaggle_answer(req)
    body = getattr(req, "uploaded", None) or req.body
    with open(os.environ["FAKE_KAGGLE_LOG"], "a") as log:
        log.write(json.dumps({{"method": req.method, "url": req.url, "body": body.decode() if isinstance(body, bytes)
                              else body}}) + "\\n")
    return r

requests.Session.send = send
"""


def test_make_submit_uploads_the_submission_with_the_blends_figures(tmp_path):
    """`make submit` as a user runs it after `make demo`: the files dvc.yaml's stages write (the blend's validation
    figures in metrics/blend.json, predict's calibration in metrics/predict.json), the real Makefile and Kaggle
    client, only the network answered by a fake."""
    project = tmp_path / "project"
    (project / "data" / "prepared").mkdir(parents=True)
    (project / "submissions").mkdir()
    (project / "metrics").mkdir()
    shutil.copy(ROOT / "Makefile", project / "Makefile")
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    os.utime(project / "pyproject.toml", (0, 0))  # older than the venv's install stamp: make installs nothing
    (project / "data" / "prepared" / "sample_submission.csv").write_text("id,label\n1,0.5\n2,0.5\n3,0.5\n")
    (project / "submissions" / "submission.csv").write_text("id,label\n1,0.0125\n2,0.9875\n3,0.5\n")
    (project / "metrics" / "blend.json").write_text(json.dumps(BLEND))
    (project / "metrics" / "predict.json").write_text(json.dumps(PREDICT))
    git = lambda *a: subprocess.run(["git", *a], cwd=project, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    commit = git("rev-parse", "--short", "HEAD").stdout.strip()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(root=str(ROOT)))
    env = {
        **tool_env(), "PYTHONPATH": str(tmp_path / "site"), "FAKE_KAGGLE_LOG": str(tmp_path / "sent.jsonl"),
        "KAGGLE_API_TOKEN": "fake-token", "HOME": str(tmp_path / "home"), "KAGGLE_CONFIG_DIR": str(tmp_path / "kg"),
    }  # fmt: skip
    make = ["make", "--no-print-directory", "submit", f"VENV={BIN.parent}", "MESSAGE=first try"]
    done = subprocess.run(make, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = [json.loads(line) for line in (tmp_path / "sent.jsonl").read_text().splitlines()]
    put = next(r for r in sent if r["method"] == "PUT")
    assert put["body"] == (project / "submissions" / "submission.csv").read_text()
    create = json.loads(next(r for r in sent if "CreateSubmission" in r["url"])["body"])
    expected = f"{commit} lite0+lite1 valid acc=0.9123 logloss=0.2567 T=1.234 clip=0.0125 tta first try"
    assert create["submissionDescription"] == expected
    assert "Successfully submitted" in done.stderr

    (project / "metrics" / "blend.json").unlink()  # a project whose pipeline has not run: what to do, no upload
    (tmp_path / "sent.jsonl").unlink()
    done = subprocess.run(make, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "metrics/blend.json not found: make the submission first" in done.stderr
    assert not (tmp_path / "sent.jsonl").exists()
