"""The served model in the BentoML store: found, complete, and carrying the calibration the submission applies.

`stored_model(name)` is the model `dvc repro package` imported, or None with a warning that says what to run (so the
service module imports without one); `check_stored(model)` raises SystemExit with a one-line message for a model an
interrupted `package` left incomplete, or one stored without its calibration. The service runs it as a BentoML
deployment hook: once, in the server's main process, before any worker starts (raised in a worker's `__init__`, the
server would restart that worker for ever and never answer).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from pipeline.calibration import CalibrationError
from pipeline.contract import ModelContract
from pipeline.data import ModelError

log = logging.getLogger("bentoml.dogs_vs_cats")

REPACKAGE = "run 'dvc repro -f -s package' (forced: dvc.lock may be current)"


def stored_model(name: str):
    """The latest model `name` in the store, or None, after a warning that says what to run."""
    try:
        return bentoml.models.get(f"{name}:latest")
    except NotFound:  # `bentoml serve` then fails with BentoML's own error, which talks of a cloud context
        log.warning(
            "no model '%s' in the BentoML store (%s): run 'dvc repro package' (or 'make demo') first, with the same "
            "BENTOML_HOME; if dvc says the stage didn't change (the store was emptied since it ran), "
            "'dvc repro -f -s package'",
            name,
            os.environ.get("BENTOML_HOME", "~/bentoml"),
        )
        return None


def stored_contract(model) -> ModelContract:
    """The model's contract `package` stored with it: its preprocessing and classes, and the TTA, temperature and
    clip `predict` applies to the submission."""
    try:
        return ModelContract.from_record(model.info.metadata, f"model {model.tag}")
    except KeyError as e:
        raise SystemExit(
            f"model {model.tag} in the BentoML store has no {e.args[0]} (packaged before the service applied the "
            f"submission's calibration): {REPACKAGE}"
        ) from None
    except (CalibrationError, ModelError) as e:
        raise SystemExit(f"model {model.tag}: {e}") from None


def check_stored(model) -> None:
    """SystemExit with what to run, for a model a killed `package` left with part of its files, or without its
    calibration."""
    short = [
        name
        for name, size in model.info.metadata.get("files", {}).items()
        if not (Path(model.path) / name).is_file() or (Path(model.path) / name).stat().st_size != size
    ]
    if short:
        raise SystemExit(
            f"model {model.tag} in the BentoML store is incomplete (files missing or short: {', '.join(short)}), as "
            f"an interrupted 'dvc repro package' leaves it: {REPACKAGE}"
        )
    stored_contract(model)
