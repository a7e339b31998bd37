"""Stage `package`: import models/onnx/ into the BentoML model store, for `serving/service.py`.

`python -m pipeline.package --onnx models/onnx --metrics metrics --out models/bentoml-model.json`
(run by `dvc repro package`). The store is `$BENTOML_HOME/models` (default `~/bentoml`); afterwards
`bentoml models list` shows `dogs-vs-cats:<version>`, where the version is a hash of the ONNX files,
so one model version is one pipeline output. The model's metadata carries the validation and export
metrics, the training params and the ONNX contract; the service and its page read them from there.
`--out` records the tag and the store for DVC (the store itself lives outside the repo).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from pipeline.config import FetchParams, PackageParams, TrainParams, load_params
from pipeline.data import MODEL_FILE, atomic_write_text, read_metadata

log = logging.getLogger("package")
METRIC_FILES = ("evaluate", "export")


def content_version(onnx_dir: Path) -> str:
    """A hash of every file of the ONNX folder: the same model, the same version."""
    h = hashlib.sha256()
    for path in sorted(onnx_dir.iterdir()):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def without_none(value):
    """`value` without the None entries of its dicts: BentoML's model metadata refuses None (JSON null)."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def model_metadata(onnx_dir: Path, metrics_dir: Path, train: TrainParams) -> dict:
    """What the service and its page show about the model: metrics, params, the ONNX contract."""
    meta = {"onnx": {k: list(v) if isinstance(v, tuple) else v for k, v in read_metadata(onnx_dir).items()}}
    for name in METRIC_FILES:
        path = metrics_dir / f"{name}.json"
        if path.exists():
            meta[name] = without_none(json.loads(path.read_text()))
    meta["train"] = dataclasses.asdict(train)
    return meta


def import_model(onnx_dir: Path, name: str, metadata: dict, labels: dict) -> bentoml.Model:
    """Copy the ONNX folder into the store as `name:<content hash>`, replacing an earlier import of it."""
    tag = f"{name}:{content_version(onnx_dir)}"
    try:
        bentoml.models.delete(tag)
        log.info("replacing %s", tag)
    except NotFound:
        pass
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for path in sorted(onnx_dir.iterdir()):  # model.onnx, its external data model.onnx.data, the variants
            shutil.copyfile(path, Path(model.path) / path.name)
    return bentoml.models.get(tag)  # as stored (inside `create` the path is a temporary folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Import the ONNX model into the BentoML model store.")
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="folder of the stages' metrics files")
    parser.add_argument("--out", type=Path, required=True, help="a JSON record of the tag, for DVC")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = load_params(PackageParams, "package", args.params)
    train = load_params(TrainParams, "train", args.params)
    source = load_params(FetchParams, "fetch", args.params).source
    if not (args.onnx / MODEL_FILE).exists():
        raise SystemExit(f"{args.onnx / MODEL_FILE} not found: run 'dvc repro export' first")
    labels = {
        "data": source if source in ("kaggle", "demo") else "local",
        "weights": train.weights,
        "finetune": train.finetune,
    }
    try:
        model = import_model(args.onnx, p.model_name, model_metadata(args.onnx, args.metrics, train), labels)
    except OSError as e:  # BENTOML_HOME cannot be created or written
        raise SystemExit(
            f"package failed: cannot write the BentoML model store ({e.__class__.__name__}: {e}). Set BENTOML_HOME "
            "to a folder you can write (default ~/bentoml), then run 'dvc repro package' again"
        ) from None
    store = str(Path(model.path).parents[1])
    atomic_write_text(args.out, json.dumps({"tag": str(model.tag), "store": store}, indent=2) + "\n")
    log.info("imported %s into %s ('bentoml models list' shows it)", model.tag, store)


if __name__ == "__main__":
    main()
