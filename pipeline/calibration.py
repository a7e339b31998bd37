"""From a logit to the P(dog) the submission holds: the TTA views averaged, a temperature and a clip.

Not a stage: the calibration part of the model's contract (pipeline/contract.py), which `predict` applies and
`package` stores with the served model, so the service's probability is the submission's by construction.
`Calibration.chosen` reads what `evaluate` or `blend` fitted on validation; `Calibration.p_dog` applies it to logits.
numpy only (no torch, no scipy): the bento ships it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import tta as views


class CalibrationError(ValueError):
    """The calibration record is missing or unusable; the message says what to run."""


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64, without overflow for large |z|."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def logit_difference(probs: np.ndarray, dog: int) -> np.ndarray:
    """z_dog - z_cat from the softmax output (N, 2), as float64: for two classes softmax(logits / T) depends only on
    it, so the ONNX model's probabilities are enough to scale a temperature (and to blend members)."""
    p = np.maximum(probs.astype(np.float64), np.finfo(np.float32).tiny)  # a P that underflowed to 0
    return np.log(p[:, dog]) - np.log(p[:, 1 - dog])


@dataclass(frozen=True)
class Calibration:
    """How a logit becomes the submitted P(dog): the TTA views averaged (`predict.tta`, fixed before the calibration
    was fitted, since it was fitted on their mean), a temperature (None: none) and a clip to [clip, 1 - clip]."""

    tta: bool | str
    temperature: float | None
    clip: float

    def __post_init__(self) -> None:
        try:
            views.check(self.tta)
        except ValueError as e:
            raise CalibrationError(f"{e}: run 'dvc repro' again") from None
        if not 0 <= self.clip < 0.5:
            raise CalibrationError(f"clip {self.clip} is outside [0, 0.5): P(dog) would be clipped to an empty range")
        if self.temperature is not None and not self.temperature > 0:
            raise CalibrationError(f"temperature {self.temperature} is not positive: run 'dvc repro' again")

    @classmethod
    def chosen(cls, setting: str | float, tta: bool | str, metrics: Path) -> Calibration:
        """predict.clip's calibration: a number is that fixed clip alone; "evaluate" is what evaluate (or blend, for
        the blend) chose on validation, as `metrics` records it: its temperature and the clip searched on top of
        it when the temperature beat the clip alone there, else the clip."""
        if setting != "evaluate":
            return cls(tta=tta, temperature=None, clip=float(setting))
        if not metrics.exists():
            raise CalibrationError(f"{metrics} not found: run 'dvc repro', or set predict.clip to a number")
        try:
            return cls.fitted(json.loads(metrics.read_text()), tta)
        except KeyError as e:
            raise CalibrationError(f"{metrics} lacks {e} (not written by evaluate or blend): run 'dvc repro'") from e

    @classmethod
    def fitted(cls, record: dict, tta: bool | str) -> Calibration:
        """The calibration in an evaluate.json or blend.json record (`pipeline.scoring.evaluate` writes it): the
        temperature and the clip on top of it when the temperature won on validation, else the clip alone. KeyError
        if the record lacks them."""
        if record.get("calibration") == "temperature":
            return cls(tta=tta, temperature=float(record["temperature"]), clip=float(record["temperature_clip"]))
        return cls(tta=tta, temperature=None, clip=float(record["clip"]))

    @classmethod
    def from_dict(cls, record: dict) -> Calibration:
        """Read back `as_dict` (the model store's metadata)."""
        try:
            return cls(tta=record["tta"], temperature=record.get("temperature"), clip=float(record["clip"]))
        except (KeyError, TypeError) as e:
            raise CalibrationError(f"calibration record {record!r} lacks {e}: run 'dvc repro package' again") from e

    def as_dict(self) -> dict:
        """A JSON-able record; no temperature is no key (BentoML's metadata refuses null)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def describe(self) -> str:
        t = "no temperature" if self.temperature is None else f"temperature {self.temperature:.3f}"
        return f"{views.describe(self.tta)}, {t}, clip {self.clip:.4f}"

    def p_dog(self, z: np.ndarray) -> np.ndarray:
        """P(dog) (float64) from logits z_dog - z_cat: scaled by the temperature, then clipped."""
        p = sigmoid(np.asarray(z, dtype=np.float64) / (self.temperature or 1.0))
        return np.clip(p, self.clip, 1 - self.clip)
