"""The predict section: the submission."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import at_least, interval
from pipeline.tta import Setting


@dataclass(frozen=True)
class PredictParams:
    batch_size: int = at_least(1)  # images per ONNX Runtime call
    workers: int = at_least(0)  # JPEG decode + resize threads; 0 = one per CPU core
    # test-time augmentation (pipeline/tta.py): true or flip, the mean logit of the image and its mirror (2x the
    # compute); flip+close, and of a closer crop and its mirror (4x)
    tta: Setting
    # "evaluate": what blend chose (metrics/blend.json); a number: that fixed clip
    clip: Literal["evaluate"] | float = interval("[0, 0.5)")
    provider: Literal["auto", "cpu", "cuda"]  # ONNX Runtime provider; auto: CUDA when really obtained, else CPU
    max_pixels: int = at_least(1)  # larger test images are unreadable (decompression bombs), predicted 0.5
    variant: Literal["auto", "fp32", "int8", "fp16"]  # model file; auto: fp16 on CUDA if it passed export, else fp32
