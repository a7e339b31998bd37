"""Stage `fetch`: get the competition zip (Kaggle API, the offline demo generator, or a local copy).

`python -m pipeline.stages.fetch --zip data/raw/dogs-vs-cats-redux-kernels-edition.zip --labels
data/raw/demo_test_labels.csv --downloads downloads` (run by `dvc repro fetch`). `fetch.source` in params.yaml picks:
- `kaggle`: `KaggleApi.competition_download_files`; needs credentials and the rules accepted;
- `demo`: the seeded synthetic data set of `pipeline.demo`, plus its hidden test labels;
- a path to the competition zip, or to a folder holding `train.zip`, `test.zip` and
  `sample_submission.csv` (for a download made in a browser). Its home is `downloads/`, which git
  ignores: never inside `data/raw/`, this stage's output, which DVC empties before the stage runs
  (`make repro ZIP=downloads/dogs-vs-cats-redux-kernels-edition.zip` runs the real recipe on it).
Every failure ends the stage with one paragraph saying what to do. The zip is written under a
temporary name and renamed, so an interrupted download never looks like a finished one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import zipfile
from pathlib import Path

from pipeline.config import load_params, setup_logging
from pipeline.demo import write_demo_zip
from pipeline.files import atomic_folder
from pipeline.kaggle_api import credentials_help, explain_http_error
from pipeline.params.fetch import FetchParams

log = logging.getLogger("fetch")
MEMBERS = ("sample_submission.csv", "test.zip", "train.zip")


class FetchError(RuntimeError):
    """The data could not be fetched; the message says what to do."""


def download_from_kaggle(competition: str, dest: Path) -> Path:
    """Download the competition zip into folder `dest`; returns the zip's path."""
    import requests  # kaggle's own HTTP library: its errors are what the client raises

    try:
        # `import kaggle` authenticates at import in some releases (SystemExit without credentials) and
        # prints help to stdout: keep it quiet, and authenticate explicitly where a failure is reported
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()  # raises SystemExit (not an Exception) when no credentials exist
        api.competition_download_files(competition, path=str(dest), quiet=True)
    except SystemExit as e:
        raise FetchError(credentials_help(competition)) from e
    except requests.exceptions.HTTPError as e:
        status = e.response.status_code if e.response is not None else None
        raise FetchError(explain_http_error(competition, status, str(e))) from e
    except requests.exceptions.ConnectionError as e:
        raise FetchError(
            f"Cannot reach Kaggle ({e.__class__.__name__}): this machine seems offline. Run where "
            f"api.kaggle.com is reachable, or download the data in a browser from "
            f"https://www.kaggle.com/competitions/{competition}/data and set fetch.source to the "
            "zip's path (or its unpacked folder). 'make demo' runs offline on synthetic data."
        ) from e
    path = dest / f"{competition}.zip"
    if not path.exists():
        raise FetchError(f"Kaggle reported success but {path} was not written: files {os.listdir(dest)}")
    return path


def check_competition_zip(path: Path) -> None:
    """Fail unless `path` is a zip holding train.zip, test.zip and sample_submission.csv."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except zipfile.BadZipFile as e:
        raise FetchError(f"{path} is not a zip file ({e}): download it again.") from e
    missing = [m for m in MEMBERS if m not in names]
    if missing:
        raise FetchError(
            f"{path} is not the competition zip: it lacks {', '.join(missing)} "
            f"(it holds {', '.join(sorted(names)[:5])}...)."
        )


def copy_local(source: Path, dest_zip: Path) -> None:
    """A competition zip, or a folder with its three files, copied to `dest_zip`."""
    if source.is_file():
        check_competition_zip(source)
        shutil.copyfile(source, dest_zip)
    elif source.is_dir():
        missing = [m for m in MEMBERS if not (source / m).is_file()]
        if missing:
            raise FetchError(f"{source} lacks {', '.join(missing)}: it must hold {', '.join(MEMBERS)}.")
        with zipfile.ZipFile(dest_zip, "w", zipfile.ZIP_STORED) as zf:  # the inner zips are compressed
            for m in MEMBERS:
                zf.write(source / m, m)
    else:
        raise FetchError(
            f"fetch.source is '{source}', which is neither 'kaggle', 'demo' nor an existing zip or "
            "folder. Set it to one of those in params.yaml."
        )


def check_source_outside(source: Path, out: Path, competition: str) -> None:
    """Fail when a local source lies inside `out`, the stage's output: DVC deleted it before the stage ran."""
    if source.resolve().is_relative_to(out.resolve()):
        raise FetchError(
            f"fetch.source is '{source}', inside {out}/, this stage's own output: DVC empties {out}/ before "
            f"the stage runs, so the file is gone by now. Put the zip in downloads/ (git ignores it) and set "
            f"fetch.source: downloads/{competition}.zip, or run 'make repro ZIP=downloads/{competition}.zip'."
        )


def fetch(params: FetchParams, zip_path: Path, labels_path: Path, downloads: Path) -> None:
    """Write the competition zip (and, for the demo, the hidden test labels) into `zip_path.parent`. `downloads`: the
    browser zip's home, a dependency of the stage (a zip elsewhere is copied with a warning: DVC does not see it)."""
    out = zip_path.parent
    if params.source not in ("kaggle", "demo"):
        check_source_outside(Path(params.source).expanduser(), out, params.competition)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:  # the whole folder appears at once
        if params.source == "kaggle":
            got = download_from_kaggle(params.competition, tmp)
            got.rename(tmp / zip_path.name)
        elif params.source == "demo":
            write_demo_zip(tmp / zip_path.name, tmp / labels_path.name, params.demo)
        else:
            source = Path(params.source).expanduser()
            if not source.resolve().is_relative_to(downloads.resolve()):
                log.warning(
                    "%s is outside %s/, so DVC does not track it: if its content changes, 'dvc repro' will not "
                    "notice. Keep the zip in %s/ (a dependency of this stage)",
                    source, downloads, downloads,
                )  # fmt: skip
            copy_local(source, tmp / zip_path.name)
        check_competition_zip(tmp / zip_path.name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Fetch the competition zip.")
    parser.add_argument("--zip", type=Path, required=True, help="where the competition zip goes")
    parser.add_argument("--labels", type=Path, required=True, help="demo only: hidden test labels")
    parser.add_argument("--downloads", type=Path, required=True, help="the browser zip's home (a dependency)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(FetchParams, "fetch", args.params)
    if args.zip.parent != args.labels.parent:
        parser.error("--zip and --labels must be in the same folder (the stage's output)")
    try:
        fetch(params, args.zip, args.labels, args.downloads)
    except FetchError as e:
        raise SystemExit(f"fetch failed: {e}") from None
    size = args.zip.stat().st_size / 2**20
    log.info("source=%s wrote %s (%.1f MiB)", params.source, args.zip, size)


if __name__ == "__main__":
    main()
