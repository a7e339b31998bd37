"""The evaluate and blend sections: validation metrics and the calibration fitted there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int  # validation images per forward pass
    workers: int  # DataLoader worker processes
    lesson_clip: float  # the lesson's fixed clip, reported beside the searched one
    clip_max: float  # the clip search tries 0 .. clip_max
    clip_step: float  # ... in steps of this
    temperature_scaling: bool  # also fit a temperature (+ clip); predict applies it when it beats the clip alone
    show_images: int  # images in each diagnostic grid (top losses, most uncertain)


@dataclass(frozen=True)
class BlendParams:
    method: Literal["mean", "fit"]  # mean of the members' logits, or weights fitted on validation (>= 0, sum 1)
    folds: int  # the fitted weights' gain is also measured out of sample, by this many folds of validation
