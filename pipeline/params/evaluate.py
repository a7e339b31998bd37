"""The evaluate and blend sections: validation metrics and the calibration fitted there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import above, at_least, interval, zero_or_at_least


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = at_least(1)  # validation images per forward pass
    workers: int = at_least(0)  # DataLoader worker processes
    lesson_clip: float = interval("[0, 0.5)")  # the lesson's fixed clip, reported beside the searched one
    clip_max: float = interval("[0, 0.5)")  # the clip search tries 0 .. clip_max
    clip_step: float = above(0)  # ... in steps of this
    temperature_scaling: bool  # also fit a temperature (+ clip); predict applies it when it beats the clip alone
    show_images: int = at_least(1)  # images in each diagnostic grid (top losses, most uncertain)


@dataclass(frozen=True)
class BlendParams:
    method: Literal["mean", "fit"]  # mean of the members' logits, or weights fitted on validation (>= 0, sum 1)
    folds: int = zero_or_at_least(2)  # the fitted weights' gain is also measured on this many folds of validation
