"""The predict section: the submission."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PredictParams:
    batch_size: int  # images per ONNX Runtime call
    workers: int  # JPEG decode + resize threads; 0 = one per CPU core
    tta: bool  # test-time augmentation: average P(dog) of the image and its mirror (2x the compute)
    clip: Literal["evaluate"] | float  # "evaluate": what blend chose (metrics/blend.json); a number: that fixed clip
    provider: Literal["auto", "cpu", "cuda"]  # ONNX Runtime provider; auto: CUDA when really obtained, else CPU
    max_pixels: int  # larger test images are unreadable (decompression bombs), predicted 0.5
    variant: Literal["auto", "fp32", "int8", "fp16"]  # model file; auto: fp16 on CUDA if it passed export, else fp32
