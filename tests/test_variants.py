"""variants: the bounds `judge_variant` holds an int8 or fp16 copy of the model to, with params.yaml's export
section. Accuracy may drop by a share of the validation set (never less than a few images), log loss by a ratio of
fp32's or a fixed slack, whichever is larger; NaN is refused. Writing and picking the variants: tests/test_export.py."""

import pytest

from pipeline.config import load_params
from pipeline.params.export import ExportParams
from pipeline.variants import judge_variant
from tests.conftest import ROOT


def fp32_and(n: int, accuracy: float, log_loss: float) -> tuple[dict, dict]:
    ref = {"accuracy": 0.98, "log_loss": 0.030} if n == 1000 else {"accuracy": 0.9633, "log_loss": 0.1522}
    return {"n": n, **ref}, {"n": n, "accuracy": accuracy, "log_loss": log_loss}


@pytest.mark.parametrize(
    "n, accuracy, log_loss, refused",
    [
        (300, 0.9633, 0.1636, None),  # int8 on an AVX-512 VNNI CPU (the demo): 7.5% above fp32, same accuracy
        (300, 0.9633, 0.1410, None),  # int8 on an AVX2 CPU
        (300, 0.9633, 0.418, "log loss 0.4180 is 2.75x fp32's 0.1522"),  # the softmax quantized to int8
        (300, 0.9633, 0.1680, "over the bound 0.1674"),  # 1.1x
        (1000, 0.98, 0.034, None),  # a strong model: +0.004 is within the 0.005 slack though 1.13x
        (1000, 0.98, 0.0355, "over the bound 0.0350"),
        (300, 0.9633 - 2 / 300, 0.155, None),  # 2 more images wrong of 300: within the slack
        (300, 0.9633 - 3 / 300, 0.155, "3 more of the 300 validation images wrong"),
        (2000, 0.9633 - 10 / 2000, 0.155, None),  # 0.5% of 2,000
        (2000, 0.9633 - 11 / 2000, 0.155, "11 more of the 2000 validation images wrong"),
        (300, 0.9633, float("nan"), "log loss nan"),
    ],
)
def test_variant_bounds_scale_with_the_validation_set(n, accuracy, log_loss, refused):
    params = load_params(ExportParams, "export", ROOT / "params.yaml")
    reason = judge_variant(*fp32_and(n, accuracy, log_loss), params)
    assert reason is None if refused is None else refused in reason
