"""Submit `submissions/submission.csv` to Kaggle (a command, not a DVC stage: it changes the world).

`python -m pipeline.tools.submit --submission submissions/submission.csv --prepared data/prepared --metrics
metrics/blend.json --predict-metrics metrics/predict.json [--message TEXT]` (run by `make submit`).

Validates the file again against `sample_submission.csv` (the clip it must respect is the one predict
applied, from `metrics/predict.json`), then uploads it with `KaggleApi.competition_submit`. The message
names the git commit (`-dirty` when the tree has uncommitted changes), the members and the blend's calibrated
validation figures with the calibration and TTA predict applied, so a leaderboard entry can be traced back to
the code and model that made it. Without credentials, without the
rules accepted, offline, or when Kaggle does not accept the upload, it stops with what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import subprocess
from pathlib import Path

import pandas as pd

from pipeline.calibration import Calibration, CalibrationError
from pipeline.config import load_params, setup_logging
from pipeline.data import SubmissionError, read_sample_ids, validate_submission
from pipeline.kaggle_api import credentials_help, explain_http_error
from pipeline.params.fetch import FetchParams

log = logging.getLogger("submit")


class SubmitError(RuntimeError):
    """The submission was not made; the message says what to do."""


def git_commit(cwd: Path | None = None) -> str:
    """The short commit of HEAD, with `-dirty` when tracked files have uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SubmitError(
            f"cannot read the git commit ({e}): submit from the project's git checkout, so the "
            "leaderboard entry can be traced to its code"
        ) from e
    return commit + ("-dirty" if dirty else "")


def tta_note(tta) -> str:
    """The message's TTA word: none, " tta" (the flip), or " tta=<views>"."""
    return "" if not tta else " tta" if tta in (True, "flip") else f" tta={tta}"


def submission_message(commit: str, blend: dict, predict: dict, note: str | None = None) -> str:
    """One line for the leaderboard: commit, members, the blend's validation accuracy and calibrated log loss, and
    the calibration predict applied (temperature, clip, TTA: metrics/predict.json, read as a `Calibration`)."""
    applied = Calibration.from_dict(predict)
    temperature = f"T={applied.temperature:.3f} " if applied.temperature is not None else ""
    try:
        fitted = Calibration.fitted(blend, applied.tta)
    except (KeyError, CalibrationError):  # a blend.json without its calibration: the loss is not calibrated
        fitted = None
    # the blend's calibrated loss describes the submission only when predict applied the blend's calibration
    same = lambda a, b: a == b or (a is not None and b is not None and abs(a - b) < 1e-6)  # noqa: E731
    if fitted is not None and same(applied.temperature, fitted.temperature) and same(applied.clip, fitted.clip):
        loss = f"logloss={blend['log_loss_calibrated']:.4f}"
    else:
        loss = f"logloss={blend['log_loss']:.4f} (uncalibrated)"
    members = "+".join(name for name, weight in blend["weights"].items() if weight > 0)
    text = (
        f"{commit} {members} valid acc={blend['accuracy']:.4f} {loss} {temperature}clip={applied.clip:.4f}"
        f"{tta_note(applied.tta)}"
    )
    return f"{text} {note}" if note else text


def submit_to_kaggle(path: Path, message: str, competition: str) -> str:
    """Upload `path` as a submission; returns Kaggle's answer. SubmitError with what to do on failure."""
    import requests  # kaggle's own HTTP library: its errors are what the client raises

    out = io.StringIO()  # the client prints help and upload errors to stdout: keep them for the message
    with contextlib.redirect_stdout(out):
        from kaggle.api.kaggle_api_extended import KaggleApi
    api = KaggleApi()
    try:
        with contextlib.redirect_stdout(out):
            api.authenticate()  # raises SystemExit (not an Exception) when no credentials exist
            response = api.competition_submit(str(path), message, competition, quiet=True)
    except SystemExit as e:
        raise SubmitError(credentials_help(competition)) from e
    except requests.exceptions.HTTPError as e:
        status = e.response.status_code if e.response is not None else None
        text = explain_http_error(competition, status, str(e))
        raise SubmitError(text.replace("'dvc repro fetch'", "'make submit'")) from e
    except requests.exceptions.ConnectionError as e:
        raise SubmitError(f"Cannot reach Kaggle ({e.__class__.__name__}): this machine seems offline.") from e
    # a failed upload is not raised: the client returns this message and prints the cause
    if response.message == KaggleApi.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        printed = " ".join(out.getvalue().split())
        raise SubmitError(
            f"Kaggle did not accept the upload: {response.message}"
            f"{f' ({printed})' if printed else ''}. Try 'make submit' again later."
        )
    return f"{response.message} (submission {response.ref})" if response.ref else response.message


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Validate and submit the submission file to Kaggle.")
    parser.add_argument("--submission", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True, help="data/prepared: its sample_submission.csv")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics/blend.json: the message's figures")
    parser.add_argument("--predict-metrics", type=Path, required=True, help="metrics/predict.json: the clip applied")
    parser.add_argument("--message", help="text appended to the message (commit and metrics are always in it)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    competition = load_params(FetchParams, "fetch", args.params).competition
    for path in (args.submission, args.metrics, args.predict_metrics):
        if not path.exists():
            raise SystemExit(f"{path} not found: make the submission first ('make repro', or 'dvc repro predict')")
    predict = json.loads(args.predict_metrics.read_text())
    try:
        clip = Calibration.from_dict(predict).clip  # the clip predict applied: the file's labels must respect it
    except CalibrationError as e:
        raise SystemExit(f"{args.predict_metrics}: {e}") from None
    try:
        validate_submission(
            pd.read_csv(args.submission), read_sample_ids(args.prepared / "sample_submission.csv"), clip
        )
    except (SubmissionError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SystemExit(f"{args.submission} is not a valid submission, not submitted: {e}") from None
    try:
        message = submission_message(git_commit(), json.loads(args.metrics.read_text()), predict, args.message)
        log.info("submitting %s to %s: %s", args.submission, competition, message)
        answer = submit_to_kaggle(args.submission, message, competition)
    except SubmitError as e:
        raise SystemExit(f"submit failed: {e}") from None
    log.info("Kaggle: %s. Scores: https://www.kaggle.com/competitions/%s/submissions", answer, competition)


if __name__ == "__main__":
    main()
