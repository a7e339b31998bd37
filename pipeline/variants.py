"""The faster copies of the exported model that `export.variants` asks for, written beside model.onnx
(`pipeline.data.VARIANT_FILES`) and checked against it; called by the `export` stage.

`int8` for CPU: ONNX Runtime static quantization, QDQ format, per-channel weights, activations calibrated
on `export.calibration_images` validation images. `fp16` for GPU: weights and activations in half
precision, float32 in and out. Each is scored against the fp32 model on the whole validation set
(`judge_variant`); one that is worse than the bounds allow is refused: its file is not kept and the
reason is recorded (`export.strict` makes a refusal fail the stage instead). A speed variant never
stops the pipeline: int8 kernels differ between CPUs (AVX2, AVX-512 VNNI), fp32 results do not.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from sklearn.metrics import log_loss

from pipeline.contract import ModelContract
from pipeline.data import MAX_IR_VERSION, MODEL_FILE, VARIANT_FILES, load_image, make_session
from pipeline.params.export import ExportParams

log = logging.getLogger("export")


class CalibrationImages(CalibrationDataReader):
    """Feeds preprocessed images (N, 3, H, W) to the quantizer's calibration, a few at a time."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 8):
        self.batches = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def finish_variant(model: onnx.ModelProto, dest: Path, metadata: dict[str, str]) -> None:
    """Give a variant the fp32 model's metadata_props (the contract predict and the service read) and an
    IR version ONNX Runtime loads, and save it as one file (int8 and fp16 VGG16 are well under 2 GB)."""
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save(model, dest)


def quantize_int8(fp32_dir: Path, dest: Path, calibration: np.ndarray, metadata: dict[str, str]) -> None:
    """Static int8 quantization in QDQ format (S8S8), per-channel weights, activations ranged (MinMax) on
    `calibration`: of the options bench/int8_options.py measured (dynamic quantization, percentile, entropy,
    U8S8, reduce_range, float first/last layers, 64 or 256 images), the one that changed the validation log loss
    least (bench/README.md); MinMax keeps only each tensor's min and max per batch, so more images cost time, not
    memory."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        # shape inference + graph optimisation first, as ONNX Runtime's quantization guide asks; ONNX's own
        # shape inference is enough for a CNN (symbolic inference is for transformers, and slow)
        quant_pre_process(
            str(fp32_dir / MODEL_FILE),
            str(pre),
            skip_symbolic_shape=True,
            save_as_external_data=True,
            external_data_location="pre.onnx.data",
        )
        out = Path(tmp) / "int8.onnx"
        # the softmax stays float: in int8 its output moves in steps of 1/255, so a confident model's small
        # probabilities round to 0, and the log loss of confident answers explodes
        graph = onnx.load(pre, load_external_data=False).graph
        quantize_static(
            str(pre),
            str(out),
            CalibrationImages(calibration, ModelContract.input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[node.name for node in graph.node if node.op_type == "Softmax"],
        )
        finish_variant(onnx.load(out), dest, metadata)


def convert_fp16(fp32_dir: Path, dest: Path, metadata: dict[str, str]) -> None:
    """Weights and activations in float16, input and output kept float32 (the same contract)."""
    model = convert_float_to_float16(onnx.load(fp32_dir / MODEL_FILE), keep_io_types=True)
    finish_variant(model, dest, metadata)


def score_variants(onnx_dir: Path, variants: list[str], x: np.ndarray, y: np.ndarray, provider: str) -> dict:
    """{variant: {accuracy, log_loss, bytes}} of each variant file on images x (N, 3, H, W), labels y."""
    scores = {}
    for variant in variants:
        session, used = make_session(onnx_dir, provider, variant)
        contract = ModelContract.read(onnx_dir)
        probs = np.concatenate([contract.probs(session, x[i : i + 32]) for i in range(0, len(x), 32)])
        probs = probs.astype(np.float64)  # (N, 2)
        scores[variant] = {
            "n": int(len(y)),
            "accuracy": float(np.mean(probs.argmax(1) == y)),
            "log_loss": float(log_loss(y, probs / probs.sum(1, keepdims=True), labels=[0, 1])),
            "bytes": sum(f.stat().st_size for f in onnx_dir.glob(f"{VARIANT_FILES[variant]}*")),  # + .data
            "provider": used,
        }
    return scores


def judge_variant(ref: dict, score: dict, p: ExportParams) -> str | None:
    """Why a variant scored `score` is refused against fp32's `ref` on the same n validation images, or None.

    Accuracy: at most `max_accuracy_drop` of the images more wrong than fp32, and never fewer than
    `accuracy_slack_images` images (a 0.2-point bound is less than one image of 300). Log loss: at most
    `max_log_loss_ratio` times fp32's, a bound that scales with the model, or `log_loss_slack` above it,
    whichever is larger (a ratio of a strong model's small log loss leaves almost no room)."""
    n = score["n"]
    extra_errors = round((ref["accuracy"] - score["accuracy"]) * n)
    allowed_errors = max(p.max_accuracy_drop * n, p.accuracy_slack_images)
    reasons = []
    if extra_errors > allowed_errors:
        reasons.append(
            f"{extra_errors} more of the {n} validation images wrong than fp32 (accuracy {score['accuracy']:.4f} vs "
            f"{ref['accuracy']:.4f}; allowed: {allowed_errors:g})"
        )
    allowed = max(p.max_log_loss_ratio * ref["log_loss"], ref["log_loss"] + p.log_loss_slack)
    if not score["log_loss"] <= allowed:  # also NaN
        ratio = score["log_loss"] / ref["log_loss"] if ref["log_loss"] > 0 else float("inf")
        reasons.append(
            f"log loss {score['log_loss']:.4f} is {ratio:.2f}x fp32's {ref['log_loss']:.4f}, over the bound "
            f"{allowed:.4f} (the larger of {p.max_log_loss_ratio}x and +{p.log_loss_slack})"
        )
    return "; ".join(reasons) or None


def judge_variants(scores: dict, p: ExportParams) -> dict:
    """`scores` with each variant's drop, rise and verdict (passed, reason) added; fp32 always passes."""
    ref = scores["fp32"]
    for variant, s in scores.items():
        s["accuracy_drop"] = ref["accuracy"] - s["accuracy"]
        s["log_loss_rise"] = s["log_loss"] - ref["log_loss"]
        s["reason"] = None if variant == "fp32" else judge_variant(ref, s, p)
        s["passed"] = s["reason"] is None
    return scores


def valid_set(valid: Path, contract: ModelContract, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every validation image preprocessed (N, 3, H, W) and its label (index into the classes)."""
    paths = sorted(valid.glob("*/*.jpg"))
    x = np.stack([contract.preprocess(load_image(path, max_pixels)) for path in paths])
    return x, np.array([contract.classes.index(path.parent.name) for path in paths])


def export_variants(work: Path, p: ExportParams, contract: ModelContract, valid: Path, max_pixels: int) -> dict:
    """Write the int8/fp16 variants beside work/model.onnx, with its contract, and score them against it on the
    validation set; returns the judged scores (`judge_variants`). The caller removes the refused files."""
    x, y = valid_set(valid, contract, max_pixels)
    metadata = contract.onnx_props()
    if "int8" in p.variants:
        calibration = x[:: max(1, len(x) // p.calibration_images)][: p.calibration_images]  # both classes
        log.info("int8: calibrating on %d validation images", len(calibration))
        t0 = time.perf_counter()
        quantize_int8(work, work / VARIANT_FILES["int8"], calibration, metadata)
        log.info("int8: quantized in %.0f s", time.perf_counter() - t0)
    if "fp16" in p.variants:
        convert_fp16(work, work / VARIANT_FILES["fp16"], metadata)
    cpu = [v for v in ("fp32", "int8") if v == "fp32" or v in p.variants]
    scores = score_variants(work, cpu, x, y, "cpu")
    if "fp16" in p.variants:  # on the GPU it is made for, when there is one (ONNX Runtime's CPU runs it too)
        scores.update(score_variants(work, ["fp16"], x, y, "auto"))
    return judge_variants(scores, p)
