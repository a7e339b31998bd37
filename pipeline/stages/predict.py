"""Stage `predict`: the test set through the ONNX model -> a checked, clipped `submissions/submission.csv`.

`python -m pipeline.stages.predict --onnx models/onnx --data data/prepared --blend metrics/blend.json --labels
data/raw/demo_test_labels.csv --submission submissions/submission.csv --metrics metrics/predict.json
--member-logits predictions/test` (run by `dvc repro predict`). ONNX Runtime runs each member on CUDA when the
session really gets it, else on CPU (`predict.variant` auto: fp16 on CUDA when it passed export's check, else fp32,
never int8, so the submission is the same file on every CPU), with JPEG decoding in threads ahead of the model and
the TTA views evaluate averaged. The members' logits are blended and calibrated as `blend` chose on validation
(the model's contract, `pipeline.contract`). `sample_submission.csv` is the authority on the ids: an image that is
missing, rejected or unreadable gets P(dog) = 0.5 and is listed, never dropped. The file is validated before it is
written, atomically; with the demo's hidden labels it is scored.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss
from tqdm import tqdm

from pipeline.calibration import Calibration, CalibrationError
from pipeline.config import load_params, setup_logging
from pipeline.contract import ModelContract
from pipeline.data import (
    ImageError,
    ModelError,
    SubmissionError,
    open_model,
    read_sample_ids,
    validate_submission,
)
from pipeline.files import atomic_write, atomic_write_text
from pipeline.params.predict import PredictParams

log = logging.getLogger("predict")
UNREADABLE_P = 0.5  # an image we cannot see: P = 0.5 costs log 2, the least when nothing is known


def rejected_by_prepare(data: Path) -> dict[int, str]:
    """{test id: why prepare rejected it}, from data/prepared/rejected.csv."""
    path = data / "rejected.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["path"].startswith("rejected/test/")]
    return {int(Path(r["path"]).stem): r["reason"] for r in rows}


def load_input(path: Path, contract: ModelContract, max_pixels: int) -> np.ndarray | ImageError:
    """One image as the model's input, (3, H, W) or its K TTA crops (K, 3, H, W), as the service makes it, or the
    reason it cannot be. Runs in a decode thread."""
    try:
        return contract.load_inputs(path, max_pixels)
    except ImageError as e:
        return e


def decoded_batches(items: list, load, batch_size: int, pool: ThreadPoolExecutor, ahead: int = 2):
    """Yield (batch of items, their `load(item)` results), keeping `ahead` batches decoding while the model runs."""
    pending: deque = deque()
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        pending.append((batch, [pool.submit(load, item) for item in batch]))
        if len(pending) > ahead:
            batch, futures = pending.popleft()
            yield batch, [f.result() for f in futures]
    while pending:
        batch, futures = pending.popleft()
        yield batch, [f.result() for f in futures]


def build_submission(ids: np.ndarray, p_dog: np.ndarray, clip: float) -> pd.DataFrame:
    """`id,label` sorted by numeric id, label = P(dog) clipped to [clip, 1 - clip]."""
    p_dog = np.asarray(p_dog, dtype=np.float64)  # clipped in float32, 0.02 would fall below 0.02
    df = pd.DataFrame({"id": ids, "label": np.clip(p_dog, clip, 1 - clip)})
    return df.sort_values("id", kind="stable").reset_index(drop=True)


def score(df: pd.DataFrame, labels_path: Path) -> dict:
    """Log loss and accuracy of the submission against the demo's hidden labels (label 1 = dog)."""
    truth = pd.read_csv(labels_path)
    if sorted(truth["id"]) != sorted(df["id"]):
        raise SystemExit(f"the ids in {labels_path} differ from the submission's: the chain lost or renamed images")
    merged = df.merge(truth, on="id", suffixes=("", "_true"))
    y, p = merged["label_true"].to_numpy(), merged["label"].to_numpy()
    return {"accuracy": float(np.mean((p > 0.5) == (y == 1))), "log_loss": float(log_loss(y, p, labels=[0, 1]))}


def read_blend(path: Path) -> tuple[dict[str, float], dict]:
    """({member: weight}, the blend's metrics) from metrics/blend.json."""
    if not path.exists():
        raise SystemExit(f"{path} not found: run 'dvc repro blend'")
    chosen = json.loads(path.read_text())
    weights = chosen.get("weights")
    if not isinstance(weights, dict) or not weights or not all(isinstance(w, int | float) for w in weights.values()):
        raise SystemExit(f"{path} has no member weights: run 'dvc repro blend' again")
    return {str(m): float(w) for m, w in weights.items()}, chosen


def open_member(onnx_dir: Path, p: PredictParams, calibration: Calibration) -> tuple[object, ModelContract, dict]:
    """(ONNX Runtime session, the member's contract with the blend's calibration, {provider, variant}) of one
    member's ONNX folder."""
    try:
        contract = ModelContract.read(onnx_dir).calibrated(calibration, p.variant)
        session, provider, variant = open_model(onnx_dir, p.provider, p.variant, cpu_variant="fp32")
    except ModelError as e:
        raise SystemExit(f"predict failed: {e}") from None
    log.info("%s: variant %s on %s (session providers %s)", onnx_dir, variant, provider, session.get_providers())
    return session, contract, {"provider": provider, "variant": variant}


def test_images(data: Path, ids: list[int]) -> tuple[dict[int, Path], dict[int, str]]:
    """({id: image} to predict, {id: why it cannot be}) for the sample submission's ids."""
    test_dir = data / "test" / "unknown"
    on_disk = {int(f.stem): f for f in test_dir.glob("*.jpg") if f.stem.isdigit()}
    rejected = rejected_by_prepare(data)
    unreadable = {
        i: f"rejected by prepare: {rejected[i]}" if i in rejected else f"no image {test_dir}/{i}.jpg"
        for i in ids
        if i not in on_disk
    }
    extra = sorted(set(on_disk) - set(ids))
    if extra:
        log.warning("%d test images not in the sample submission, not predicted: %s", len(extra), extra[:10])
    return {i: on_disk[i] for i in ids if i in on_disk}, unreadable


def predict_member(session, contract: ModelContract, images: dict[int, Path], p: PredictParams) -> tuple[dict, dict]:
    """({id: logit}, {id: why unreadable}) of one member over the test images. Decode threads: Pillow releases the
    GIL while decoding and resizing, so threads run in parallel without pickling each (3, H, W) array back from a
    process, and ONNX Runtime's own threads share the cores."""
    z: dict[int, float] = {}
    unreadable: dict[int, str] = {}
    todo = list(images)
    load = lambda i: load_input(images[i], contract, p.max_pixels)  # noqa: E731
    with ThreadPoolExecutor(p.workers or os.cpu_count() or 1) as pool:
        batches = decoded_batches(todo, load, p.batch_size, pool)
        for batch, results in tqdm(batches, desc="predict", total=-(-len(todo) // p.batch_size), mininterval=2):
            good = {i: x for i, x in zip(batch, results, strict=True) if not isinstance(x, ImageError)}
            unreadable.update((i, str(x)) for i, x in zip(batch, results, strict=True) if isinstance(x, ImageError))
            if good:
                z.update(zip(good, contract.logits(session, np.stack(list(good.values()))), strict=True))
    return z, unreadable


def write_submission(df: pd.DataFrame, ids: list[int], clip: float, path: Path) -> None:
    """Validate the submission against the sample's ids, then write it atomically."""
    try:
        validate_submission(df, ids, clip)
    except SubmissionError as e:  # a bug here, never a property of the data: nothing is written
        raise SystemExit(f"predict built an invalid submission, not written: {e}") from None
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))  # never half a submission


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Predict the test set and write the Kaggle submission.")
    parser.add_argument("--onnx", type=Path, required=True, help="models/onnx: one ONNX folder per member")
    parser.add_argument("--data", type=Path, required=True, help="data/prepared")
    parser.add_argument("--blend", type=Path, required=True, help="metrics/blend.json: members, weights, calibration")
    parser.add_argument("--labels", type=Path, help="hidden test labels (the demo's): score the submission")
    parser.add_argument("--submission", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--member-logits", type=Path, help="folder for each member's test logits, <member>.csv")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    p = load_params(PredictParams, "predict", args.params)

    # 1. the members and the calibration blend chose on validation
    weights, _ = read_blend(args.blend)
    try:
        calibration = Calibration.chosen(p.clip, p.tta, args.blend)
    except CalibrationError as e:
        raise SystemExit(f"predict failed: {e}") from None
    members = {m: open_member(args.onnx / m, p, calibration) for m in weights}
    log.info("calibration: %s", calibration.describe())

    # 2. the ids (sample_submission.csv is the authority) and their images
    try:
        ids = read_sample_ids(args.data / "sample_submission.csv").tolist()
    except SubmissionError as e:
        raise SystemExit(f"predict failed: {e}") from None
    images, unreadable = test_images(args.data, ids)

    # 3. each member's logits, with its own preprocessing; the blend is their weighted sum
    t0 = time.perf_counter()
    logits = {}
    for name, (session, contract, _) in members.items():
        logits[name], bad = predict_member(session, contract, images, p)
        unreadable.update(bad)
    seconds = time.perf_counter() - t0
    if len(unreadable) == len(ids):
        raise SystemExit(f"none of the {len(ids)} test images could be read: run 'dvc repro prepare' again")
    readable = [i for i in images if i not in unreadable]
    blended = np.array([sum(w * logits[m][i] for m, w in weights.items()) for i in readable], dtype=np.float64)
    p_dog = dict(zip(readable, calibration.p_dog(blended).tolist(), strict=True))
    for i, reason in sorted(unreadable.items()):
        log.warning("test image %d unreadable, predicted %.1f: %s", i, UNREADABLE_P, reason)
        p_dog[i] = UNREADABLE_P

    if args.member_logits is not None:  # each member's own test predictions, for a look at the members alone
        for name, z in logits.items():
            rows = "".join(f"{i},{float(z[i])!r}\n" for i in sorted(z))
            atomic_write_text(args.member_logits / f"{name}.csv", "id,logit\n" + rows)

    # 4. the checked submission, and its metrics (scored when the demo's hidden labels are there)
    clip = calibration.clip
    df = build_submission(np.array(ids), np.array([p_dog[i] for i in ids]), clip)
    write_submission(df, ids, clip, args.submission)
    metrics = {
        "n": len(df),
        "members": {m: {**info, "weight": weights[m]} for m, (_, _, info) in members.items()},
        **dataclasses.asdict(calibration),  # tta, temperature (None: the clip alone), clip: what submit reads back
        "n_unreadable": len(unreadable),
        "unreadable": [{"id": i, "reason": r} for i, r in sorted(unreadable.items())],
    }
    if args.labels is not None and args.labels.exists():
        metrics.update(score(df, args.labels))
        log.info(
            "scored against %s: accuracy %.4f  log_loss %.4f", args.labels, metrics["accuracy"], metrics["log_loss"]
        )
    elif args.labels is not None:
        log.info("%s not found (only the demo data has test labels): the submission is not scored", args.labels)
    atomic_write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    log.info(
        "wrote %s: %d rows, %d member(s), clip %.4f, %d unreadable; %.1f images/s",
        args.submission, len(df), len(members), clip, len(unreadable), len(images) / seconds if images else 0.0,
    )  # fmt: skip


if __name__ == "__main__":
    main()
