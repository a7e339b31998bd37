"""The export section: the ONNX file, its parity check and its variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import any_number, at_least, interval, rule

VARIANTS = rule(lambda v: len(v) > 0 and len(set(v)) == len(v), "a non-empty list without repeats")


@dataclass(frozen=True)
class ExportParams:
    opset: int = interval("[18, 23]")  # ONNX opset: the dynamo exporter writes 18+, ONNX Runtime 1.31 runs up to 23
    parity_images: int = at_least(1)  # validation images in the ONNX Runtime vs PyTorch check
    tolerance: float = interval("(0, 1]")  # the check fails the stage when max |P_onnx - P_torch| exceeds this
    variants: tuple[Literal["fp32", "int8", "fp16"], ...] = VARIANTS  # fp32 always; int8 (CPU), fp16 (GPU)
    calibration_images: int = at_least(1)  # validation images that range the int8 activations
    max_accuracy_drop: float = interval("[0, 1]")  # a variant may get this fraction of validation more wrong ...
    accuracy_slack_images: int = at_least(0)  # ... and never fewer than this many images (one of 300 is 0.33 points)
    # a negative bound below refuses every variant (how the tests make export refuse one)
    max_log_loss_ratio: float = any_number()  # a variant's validation log loss may be at most this times fp32's ...
    log_loss_slack: float = any_number()  # ... or this much above it, whichever is larger
    strict: bool  # a refused variant fails the stage (false: it is not kept, recorded, and fp32 serves instead)
    keep_failed: bool  # a failed export keeps its temporary folder (models/.onnx.tmp, ~600 MB) to inspect
