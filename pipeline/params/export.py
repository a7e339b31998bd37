"""The export section: the ONNX file, its parity check and its variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ExportParams:
    opset: int  # ONNX opset the exporter targets (ONNX Runtime 1.31 runs up to 23)
    parity_images: int  # validation images in the ONNX Runtime vs PyTorch check
    tolerance: float  # the check fails the stage when max |P_onnx - P_torch| exceeds this
    variants: tuple[Literal["fp32", "int8", "fp16"], ...]  # files to write: fp32 always; int8 (CPU), fp16 (GPU)
    calibration_images: int  # validation images that range the int8 activations
    max_accuracy_drop: float  # a variant may get this fraction of the validation images more wrong than fp32 ...
    accuracy_slack_images: int  # ... and never fewer than this many images (one of 300 is 0.33 points)
    max_log_loss_ratio: float  # a variant's validation log loss may be at most this many times fp32's ...
    log_loss_slack: float  # ... or this much above it, whichever is larger
    strict: bool  # a refused variant fails the stage (false: it is not kept, recorded, and fp32 serves instead)
    keep_failed: bool  # a failed export keeps its temporary folder (models/.onnx.tmp, ~600 MB) to inspect
