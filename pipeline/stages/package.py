"""Stage `package`: import one member's ONNX folder into the BentoML model store, for `serving/service.py`.

`python -m pipeline.stages.package --onnx models/onnx --metrics metrics/members --blend metrics/blend.json --out
models/bentoml-model.json` (run by `dvc repro package`): the member is `package.member`, or with `best` the
member with the lowest calibrated validation log loss in metrics/blend.json; its folders are
`<onnx>/<member>` and `<metrics>/<member>`. Without `--blend`, `--onnx` and `--metrics` are the model's own
folders. The service serves one model: a blend of several would multiply its latency on a CPU.

The store is `$BENTOML_HOME/models` (default `~/bentoml`); afterwards
`bentoml models list` shows `dogs-vs-cats:<version>`, where the version is a hash of the ONNX files and
of the metadata below, so one model version is one pipeline output served one way. The model's metadata
carries the model's contract (`pipeline.contract`: the ONNX model's preprocessing, classes and training params, the
calibration and TTA that `predict` applies), the validation and export metrics and the members the submission
blends; the service applies
them and its page shows them, so a served P(dog) is the submission's when the submission is this model alone.
`--out` records the tag and the store for DVC (the store itself lives outside the repo).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from pipeline.calibration import Calibration, CalibrationError
from pipeline.config import load_params, load_value, setup_logging
from pipeline.contract import ModelContract
from pipeline.data import MODEL_FILE, ModelError
from pipeline.files import atomic_write_text
from pipeline.params.package import PackageParams
from pipeline.params.predict import PredictParams

log = logging.getLogger("package")
METRIC_FILES = ("evaluate", "export")


def content_version(onnx_dir: Path, metadata: dict, names: list[str] | None = None) -> str:
    """A hash of every file of the ONNX folder (or of those `names` in it) and of the metadata the service applies
    (calibration, TTA, metrics): the same model served the same way, the same version; a new calibration, a new one."""
    h = hashlib.sha256()
    for path in sorted(onnx_dir.iterdir()) if names is None else [onnx_dir / n for n in sorted(names)]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    h.update(json.dumps(metadata, sort_keys=True).encode())
    return h.hexdigest()[:16]


def without_none(value):
    """`value` without the None entries of its dicts: BentoML's model metadata refuses None (JSON null)."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def model_metadata(contract: ModelContract, metrics_dir: Path, submission_members: list[str]) -> dict:
    """What the service applies and shows about the model: its contract (the ONNX model's, with the training params;
    the calibration and TTA the submission applies, the predict.variant it was made with; read back by
    serving/store.py), metrics, and the members the submission blends (this model alone, or more)."""
    meta = {
        **contract.record(),
        "submission_members": submission_members,  # /info: the submission's P is this model's only if it is alone
    }
    for name in METRIC_FILES:
        path = metrics_dir / f"{name}.json"
        if path.exists():
            meta[name] = without_none(json.loads(path.read_text()))
    return meta


def is_complete(model: bentoml.Model, version: str) -> bool:
    """Whether the stored copy holds every file of the import, byte for byte (its version is their hash)."""
    names = list(model.info.metadata.get("files", {}))
    if not names or not all((Path(model.path) / n).is_file() for n in names):
        return False
    metadata = {k: v for k, v in model.info.metadata.items() if k != "files"}
    return content_version(Path(model.path), metadata, names) == version


def import_model(onnx_dir: Path, name: str, metadata: dict, labels: dict) -> bentoml.Model:
    """Copy the ONNX folder into the store as `name:<content hash>`. A complete copy already there is kept
    (nothing deleted); an incomplete one (a killed import: BentoML copies its staging folder into the store
    file by file) is replaced. The new copy is checked before the stage succeeds."""
    version = content_version(onnx_dir, metadata)
    tag = f"{name}:{version}"
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None and is_complete(existing, version):
        log.info("%s is in the store already, complete", tag)
        return existing
    if existing is not None and "files" not in existing.info.metadata:
        log.info("replacing %s (imported by an earlier version of this stage, without its file list)", tag)
        bentoml.models.delete(tag)
    elif existing is not None:
        log.warning("replacing an incomplete copy of %s (an import was interrupted)", tag)
        bentoml.models.delete(tag)
    files = {path.name: path.stat().st_size for path in sorted(onnx_dir.iterdir())}
    with bentoml.models.create(tag, labels=labels, metadata={**metadata, "files": files}) as model:
        for path in sorted(onnx_dir.iterdir()):  # model.onnx, its external data model.onnx.data, the variants
            shutil.copyfile(path, Path(model.path) / path.name)
    stored = bentoml.models.get(tag)  # as stored (inside `create` the path is a temporary folder)
    if not is_complete(stored, version):
        raise SystemExit(f"package failed: the copy of {tag} in the store differs from {onnx_dir}: run it again")
    return stored


def own_staging(name: str) -> Path:
    """Make BentoML stage the import in a folder of this stage's, under the store, not in /tmp: BentoML's staging
    folder (a copy of the model, 600 MB for VGG16) is removed only when Python exits normally, so a killed
    `package` left it in /tmp for good. Here the next run finds and removes what a killed one left."""
    staging = Path(os.environ.get("BENTOML_HOME", "~/bentoml")).expanduser() / "tmp" / "package"
    staging.mkdir(parents=True, exist_ok=True)
    for left in staging.glob(f"bentoml-model-{name}-*"):
        log.info("removing %s, left by an interrupted package", left)
        shutil.rmtree(left, ignore_errors=True)
    tempfile.tempdir = str(staging)  # tempfile.mkdtemp, which BentoML's Model.create uses, now stages here
    return staging


def choose_member(setting: str, blend: Path) -> str:
    """The member to serve: `setting` by name, or with "best" the best member on validation as blend recorded it."""
    if not blend.exists():
        raise SystemExit(f"{blend} not found: run 'dvc repro blend'")
    chosen = json.loads(blend.read_text())
    members = chosen.get("members") or {}
    if setting == "best":
        if "best_member" not in chosen:
            raise SystemExit(f"{blend} names no best member: run 'dvc repro blend' again")
        return chosen["best_member"]
    if setting not in members:
        raise SystemExit(f"package.member {setting!r} is not a member (members: {', '.join(members)}), nor 'best'")
    return setting


def submission_members(member: str | None, blend: Path | None) -> list[str]:
    """The members whose models the submission blends (a weight above zero); without a blend, this model alone."""
    if blend is None:
        return [member or "model"]
    weights = json.loads(blend.read_text()).get("weights") or {}
    return [name for name, weight in weights.items() if weight > 0]


def served_calibration(predict: PredictParams, metrics_dir: Path, member: str | None, blend: Path | None
                       ) -> Calibration:  # fmt: skip
    """The calibration predict applies to this model's logits: the blend's when the blend is this member alone
    (then the service's P is the submission's), else the member's own from its evaluate.json."""
    source = metrics_dir / "evaluate.json"
    if blend is not None and submission_members(member, blend) == [member]:
        source = blend
    try:
        return Calibration.chosen(predict.clip, predict.tta, source)
    except CalibrationError as e:
        raise SystemExit(f"package failed: {e}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Import the ONNX model into the BentoML model store.")
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="folder of the stages' metrics files")
    parser.add_argument("--out", type=Path, required=True, help="a JSON record of the tag, for DVC")
    parser.add_argument("--blend", type=Path, help="metrics/blend.json: --onnx and --metrics hold one folder a member")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    p = load_params(PackageParams, "package", args.params)
    member = None
    if args.blend is not None:
        member = choose_member(p.member, args.blend)
        args.onnx, args.metrics = args.onnx / member, args.metrics / member
        log.info("serving member %s (package.member: %s)", member, p.member)
    predict = load_params(PredictParams, "predict", args.params)
    calibration = served_calibration(predict, args.metrics, member, args.blend)
    log.info("the service applies the submission's calibration: %s", calibration.describe())
    source = load_value("fetch", "source", str, args.params)
    if not (args.onnx / MODEL_FILE).exists():
        raise SystemExit(f"{args.onnx / MODEL_FILE} not found: run 'dvc repro export' first")
    try:
        contract = ModelContract.read(args.onnx).calibrated(calibration, predict.variant)
    except ModelError as e:
        raise SystemExit(f"package failed: {e}") from None
    labels = {
        "data": source if source in ("kaggle", "demo") else "local",
        "weights": contract.weights,
        "finetune": contract.params["finetune"],
        **({"member": member} if member else {}),
    }
    # SIGTERM (dvc's, a CI's) ends the stage like Ctrl-C: BentoML's cleanup of its staging folder runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        own_staging(p.model_name)
        alone = submission_members(member, args.blend)
        metadata = model_metadata(contract, args.metrics, alone)
        model = import_model(args.onnx, p.model_name, metadata, labels)
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
