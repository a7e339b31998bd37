"""Stage `export`: a member's model -> ONNX, checked against PyTorch before it replaces the previous export.

`python -m pipeline.stages.export --model models/model.pt --data data/prepared --out models/onnx/model --metrics
metrics/members/model/export.json` (run by `dvc repro export@model`, for the member `model`). The graph is the model
plus a softmax (`image` (N, 3, H, W) -> `probs` (N, 2)), its weights beside it, and the model's contract
(preprocessing, classes, layout) in its metadata, so predict and the service need nothing but the folder. It is
written to a temporary folder and renamed into place only once `onnx.checker`, ONNX Runtime and the parity with
PyTorch on validation images (`export.tolerance`) pass. `export.variants` adds faster copies (int8, fp16), each scored
against fp32 on the validation set (`pipeline.variants`): a worse one is refused and recorded, and fp32 is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.config import load_params, load_value, setup_logging
from pipeline.contract import ModelContract
from pipeline.data import (
    MAX_IR_VERSION,
    MODEL_FILE,
    VARIANT_FILES,
    VARIANTS_RECORD,
    ModelError,
    load_image,
    make_session,
)
from pipeline.files import atomic_folder, atomic_write_text, temporary_sibling
from pipeline.model import load_model
from pipeline.params.export import ExportParams
from pipeline.variants import export_variants

log = logging.getLogger("export")


class ExportError(RuntimeError):
    """The exported model fails its own check; the message says how."""


def export_onnx(model: nn.Module, image_size: int, dest: Path, metadata: dict[str, str], opset: int) -> int:
    """Write dest/model.onnx (+ model.onnx.data): probabilities out, batch axis dynamic. Returns the IR version."""
    probs = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: a batch of 1 could be specialised away
    program = torch.onnx.export(
        probs,
        (example,),
        dynamo=True,
        verbose=False,
        opset_version=opset,
        input_names=[ModelContract.input_name],
        output_names=[ModelContract.output_name],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    program.model.metadata_props.update(metadata)
    for node in program.model.graph:  # the exporter records each node's Python stack trace, with absolute
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)  # paths: the model would vary by checkout
    if program.model.ir_version > MAX_IR_VERSION:
        # the checker below fails the stage if the opset needs the newer IR
        log.info("lowering the ONNX IR version %d to %d for ONNX Runtime", program.model.ir_version, MAX_IR_VERSION)
        program.model.ir_version = MAX_IR_VERSION
    dest.mkdir(parents=True, exist_ok=True)
    program.save(dest / MODEL_FILE, external_data=True)
    return program.model.ir_version


def parity_images(valid: Path, n: int) -> list[Path]:
    """`n` validation images spread evenly over the sorted list, so both classes are in the batch."""
    paths = sorted(valid.glob("*/*.jpg"))
    return paths[:: max(1, len(paths) // n)][:n]


@torch.no_grad()
def check_export(onnx_dir: Path, model: nn.Module, images: list, expected: dict[str, str], tolerance: float) -> float:
    """Check the ONNX folder alone (checker, metadata, ONNX Runtime on CPU) against PyTorch on `images`
    (PIL images); returns max |P_onnx - P_torch|, or raises ExportError."""
    onnx.checker.check_model(str(onnx_dir / MODEL_FILE), full_check=True)  # a path: reads the external data too
    props = {p.key: p.value for p in onnx.load(onnx_dir / MODEL_FILE, load_external_data=False).metadata_props}
    if props != expected:
        raise ExportError(f"metadata read back {props} differs from what was written {expected}")
    contract = ModelContract.read(onnx_dir)
    x = np.stack([contract.preprocess(img) for img in images])
    session, _ = make_session(onnx_dir, "cpu")  # the CPU provider: the reference, on any machine
    p_onnx = contract.probs(session, x)  # (N, 2)
    p_torch = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    if p_onnx.shape != p_torch.shape:
        raise ExportError(f"ONNX Runtime returned shape {p_onnx.shape}, PyTorch {p_torch.shape}")
    diff = float(np.abs(p_onnx - p_torch).max())
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree: max |delta P| = {diff:.3g} > export.tolerance {tolerance}"
        )
    single = contract.probs(session, x[:1])  # the batch axis is dynamic
    if not np.allclose(single, p_onnx[:1], atol=tolerance, rtol=0):
        raise ExportError("a batch of one gives other probabilities than the same image in a batch")
    return diff


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export the model to ONNX and check it.")
    parser.add_argument("--model", type=Path, required=True, help="models/<member>.pt")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared: its valid/ images check parity")
    parser.add_argument("--out", type=Path, required=True, help="the ONNX folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines narrate every optimisation pass
        logging.getLogger(name).setLevel(logging.WARNING)
    p = load_params(ExportParams, "export", args.params)
    max_pixels = load_value("prepare", "max_pixels", int, args.params)  # what prepare accepted
    try:
        model, meta = load_model(args.model, "cpu")
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    paths = parity_images(args.data / "valid", p.parity_images)
    if not paths:
        raise SystemExit(f"no images in {args.data / 'valid'}: run 'dvc repro prepare' first")
    images = [load_image(path, max_pixels) for path in paths]

    tmp = temporary_sibling(args.out)  # where atomic_folder builds it

    def fail(message: str) -> SystemExit:
        """End the stage with `args.out` untouched; the temporary folder (~600 MB for VGG16) goes unless kept."""
        kept = f"{tmp} kept to inspect" if p.keep_failed else f"set export.keep_failed: true to keep {tmp} to inspect"
        return SystemExit(f"export failed its check, {args.out} is unchanged ({kept}): {message}")

    t0 = time.perf_counter()
    contract = ModelContract.from_checkpoint(meta)
    metadata = contract.onnx_props()
    scores = {}
    # whatever stops the export (a failed check, an uncaught error, a full disk, Ctrl-C), args.out is untouched and
    # the temporary folder goes unless kept; else the checked folder appears at once
    with atomic_folder(args.out, keep_failed=p.keep_failed) as work:
        ir_version = export_onnx(model, contract.image_size, work, metadata, p.opset)
        seconds = time.perf_counter() - t0
        try:
            diff = check_export(work, model, images, metadata, p.tolerance)
        except (ExportError, ModelError, onnx.checker.ValidationError) as e:
            raise fail(str(e)) from None
        if set(p.variants) - {"fp32"}:
            try:
                scores = export_variants(work, p, contract, args.data / "valid", max_pixels)
            except ModelError as e:
                raise fail(str(e)) from None
            refused = {v: s["reason"] for v, s in scores.items() if not s["passed"]}
            if refused and p.strict:
                why = "; ".join(f"{v} is worse than fp32 on the validation set: {r}" for v, r in refused.items())
                raise fail(
                    f"{why}. Set export.strict: false to go on with fp32 in its place, widen the bounds, or drop "
                    "it from export.variants"
                )
            for variant in refused:
                (work / VARIANT_FILES[variant]).unlink()  # auto never picks it; by name, the record says why
            (work / VARIANTS_RECORD).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")

    size = sum(f.stat().st_size for f in args.out.glob(f"{MODEL_FILE}*"))  # the fp32 model + its .data
    # quality figures only: no timings (package depends on this file, and a timing differs on every run) and no byte
    # counts (they are logged, and variants.json in the ONNX folder keeps each variant's); `dvc exp show` lists these
    metrics = {
        "max_abs_diff": diff,
        "parity_images": len(images),
        "opset": p.opset,
        "ir_version": ir_version,
        # {variant: accuracy, log_loss, accuracy_drop, log_loss_rise, passed, reason}
        "variants": {v: {k: x for k, x in s.items() if k != "bytes"} for v, s in scores.items()},
        "refused": sorted(v for v, s in scores.items() if not s["passed"]),
    }
    atomic_write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    log.info(
        "wrote %s (%.1f MiB, opset %d, IR %d) in %.0fs; ONNX Runtime vs PyTorch on %d images: max |delta P| %.2g",
        args.out,
        size / 2**20,
        p.opset,
        ir_version,
        seconds,
        len(images),
        diff,
    )
    for variant, sc in scores.items():
        log.info(
            "%s: validation accuracy %.4f (drop %.4f), log loss %.4f (rise %.4f), %.1f MiB: %s",
            variant, sc["accuracy"], sc["accuracy_drop"], sc["log_loss"], sc["log_loss_rise"], sc["bytes"] / 2**20,
            "kept" if sc["passed"] else "refused",
        )  # fmt: skip
    kept = [v for v in ("fp32", *p.variants) if v == "fp32" or scores.get(v, {}).get("passed")]
    refused = [f"{v} ({s['reason']})" for v, s in scores.items() if not s["passed"]]
    if refused:
        log.warning(
            "kept %s and refused %s, so predict and the service use fp32 in its place (export.strict: true "
            "would fail the stage instead)",
            ", ".join(dict.fromkeys(kept)),
            "; ".join(refused),
        )
    else:
        log.info("kept %s", ", ".join(dict.fromkeys(kept)))


if __name__ == "__main__":
    main()
