"""The model's contract, one type: what a photo must become for the model, what its output means, and how its logit
becomes the submitted P(dog).

Filled in along the pipeline and written once in each home: `train` writes the classes, preprocessing, arch and
training params into models/<member>.pt (`ModelContract.from_checkpoint` reads them); `export` writes them into the
ONNX model's metadata (`onnx_props`; `ModelContract.read` reads the folder back); `evaluate` and `blend` choose the
calibration on validation (`Calibration.chosen` reads it, `calibrated` attaches it and predict.variant); `package`
stores the whole with the BentoML model (`record`; `ModelContract.from_record`); `predict` and the service apply it
(`inputs`, `predict`).
Not a stage: no torch (the bento ships it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from PIL import Image

from pipeline import tta as views
from pipeline.calibration import Calibration, CalibrationError, logit_difference
from pipeline.data import MODEL_FILE, ModelError, load_image, preprocess


def _text(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return json.dumps(list(value)) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class ModelContract:
    """The ONNX model's inputs and outputs, its preprocessing and provenance, and (once chosen on validation) the
    calibration and the predict.variant the submission was made with."""

    classes: tuple[str, ...]
    image_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str
    weights: str
    params_hash: str  # sha256 of the training params: which run made these weights
    run_key: str
    params: dict = dataclasses.field(default_factory=dict)  # the member's train section that made the weights
    calibration: Calibration | None = None
    variant: str | None = None
    layout: ClassVar[str] = "NCHW"
    input_name: ClassVar[str] = "image"
    output_name: ClassVar[str] = "probs"
    # the keys of the ONNX metadata (all but calibration and variant, chosen after export) and how each is read back
    ONNX_KEYS: ClassVar[tuple[str, ...]] = (
        "classes", "image_size", "resize_size", "interpolation", "arch", "layout", "mean", "std", "weights",
        "params_hash", "run_key", "input_name", "output_name", "params",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if "dogs" not in self.classes:
            raise ModelError(f"classes {self.classes} lack 'dogs': not a model of this pipeline")

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> ModelContract:
        """What `train` wrote into models/<member>.pt: classes, preprocessing, arch, weights, params and run key."""
        params = json.dumps(ckpt["params"], sort_keys=True)
        return cls(
            params=json.loads(params),  # as the ONNX metadata gives it back
            classes=tuple(ckpt["classes"]),
            image_size=int(ckpt["image_size"]),
            resize_size=int(ckpt["resize_size"]),
            interpolation=ckpt["interpolation"],
            mean=tuple(float(m) for m in ckpt["mean"]),
            std=tuple(float(s) for s in ckpt["std"]),
            arch=ckpt["arch"],
            weights=str(ckpt["weights"]),
            params_hash=hashlib.sha256(params.encode()).hexdigest(),
            run_key=str(ckpt["run_key"]),
        )

    @classmethod
    def from_strings(cls, props: dict[str, str], where: str) -> ModelContract:
        """From the ONNX metadata's strings (or their JSON record); ModelError naming `where` if it is not export's."""
        missing = sorted(set(cls.ONNX_KEYS) - set(props))
        if missing:
            raise ModelError(
                f"{where} lacks metadata {', '.join(missing)} (not written by export): run 'dvc repro export'"
            )
        fixed = {key: props[key] for key in ("layout", "input_name", "output_name")}
        if fixed != {key: getattr(cls, key) for key in fixed}:
            raise ModelError(
                f"{where}: {fixed} is not this pipeline's NCHW image -> probs model: run 'dvc repro export'"
            )
        read = lambda v: tuple(json.loads(v)) if isinstance(v, str) else tuple(v)  # noqa: E731
        try:
            return cls(
                classes=read(props["classes"]),
                image_size=int(props["image_size"]),
                resize_size=int(props["resize_size"]),
                interpolation=str(props["interpolation"]),
                mean=read(props["mean"]),
                std=read(props["std"]),
                arch=str(props["arch"]),
                weights=str(props["weights"]),
                params_hash=str(props["params_hash"]),
                run_key=str(props["run_key"]),
                params=json.loads(props["params"]) if isinstance(props["params"], str) else dict(props["params"]),
            )
        except (ValueError, TypeError) as e:
            raise ModelError(f"{where} has unreadable metadata ({e}): run 'dvc repro export' again") from None

    @classmethod
    def read(cls, onnx_dir: str | os.PathLike) -> ModelContract:
        """The contract `export` wrote into the ONNX folder's model.onnx (no calibration yet)."""
        path = Path(onnx_dir) / MODEL_FILE
        if not path.is_file():
            raise ModelError(f"{path} not found: run 'dvc repro export' first")
        try:
            props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        except DecodeError as e:
            raise ModelError(f"{path} is not an ONNX model ({e}): run 'dvc repro export' again") from e
        return cls.from_strings(props, str(path))

    def onnx_props(self) -> dict[str, str]:
        """The ONNX metadata_props export writes (`read` reads them back)."""
        return {key: _text(getattr(self, key)) for key in self.ONNX_KEYS}

    def calibrated(self, calibration: Calibration, variant: str = "auto") -> ModelContract:
        """This contract with the calibration chosen on validation and the predict.variant the submission used."""
        return dataclasses.replace(self, calibration=calibration, variant=variant)

    def record(self) -> dict:
        """A JSON-able record for the BentoML model's metadata (`from_record` reads it back)."""
        if self.calibration is None:
            raise CalibrationError("the contract has no calibration yet: package stores a calibrated one")
        onnx_part = {key: list(v) if isinstance(v := getattr(self, key), tuple) else v for key in self.ONNX_KEYS}
        return {"onnx": onnx_part, "calibration": self.calibration.as_dict(), "predict_variant": self.variant}

    @classmethod
    def from_record(cls, record: dict, where: str) -> ModelContract:
        """Read back `record` (KeyError if a part is missing: the caller says what to run)."""
        contract = cls.from_strings(record["onnx"], where)
        return contract.calibrated(Calibration.from_dict(record["calibration"]), record.get("predict_variant", "auto"))

    @property
    def dog(self) -> int:
        return self.classes.index("dogs")

    @property
    def tta(self) -> bool | str:
        return False if self.calibration is None else self.calibration.tta

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        """The short side each TTA crop resizes a photo to (pipeline/tta.py): the largest is the JPEG draft size."""
        return views.crop_sizes(self.tta, self.resize_size)

    def preprocess(self, img: Image.Image, resize_size: int | None = None) -> np.ndarray:
        """The model's own resize, centre crop, mean and std: float32 (3, H, W)."""
        return preprocess(img, self.image_size, resize_size or self.resize_size, self.mean, self.std,
                          self.interpolation)  # fmt: skip

    def inputs(self, img: Image.Image) -> np.ndarray:
        """The crops the TTA averages: (3, H, W) for one, (K, 3, H, W) for several."""
        crops = [self.preprocess(img, short) for short in self.crop_sizes]
        return crops[0] if len(crops) == 1 else np.stack(crops)

    def load_inputs(self, source, max_pixels: int) -> np.ndarray:
        """`inputs` of a photo (path or bytes), decoded at the largest crop's size at least; ImageError if unusable."""
        return self.inputs(load_image(source, max_pixels, max(self.crop_sizes)))

    def probs(self, session, x: np.ndarray) -> np.ndarray:
        """The ONNX model's softmax (N, 2) of a batch x (N, 3, H, W) on an ONNX Runtime session."""
        return session.run([self.output_name], {self.input_name: x})[0]

    def logits(self, session, x: np.ndarray, tta: bool | str | None = None) -> np.ndarray:
        """z_dog - z_cat (float64) of a batch x (N, 3, H, W), or (N, K, 3, H, W) with K crops: the mean over the views
        of `tta` (default: the calibration's), as evaluate computes the validation set's, so its calibration fits."""
        run = lambda v: logit_difference(self.probs(session, v), self.dog)  # noqa: E731
        return views.mean_over_views(run, x, self.tta if tta is None else tta)

    def predict(self, session, x: np.ndarray) -> np.ndarray:
        """Calibrated P(dog) (N,) of a batch on one model: the service's path, predict's for one member."""
        if self.calibration is None:
            raise CalibrationError("the contract has no calibration: attach one with calibrated()")
        return self.calibration.p_dog(self.logits(session, x))
