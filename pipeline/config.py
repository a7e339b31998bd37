"""Typed config: each stage's section of params.yaml, loaded into a frozen dataclass.

`load_params(FetchParams, "fetch")` reads `params.yaml` and returns a `FetchParams`. An unknown key, a
missing key or a value of the wrong type is a `ConfigError` that names the key, so a typo in
params.yaml (or in `dvc exp run -S ...`) fails the stage at once instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

PARAMS_FILE = "params.yaml"
COMPETITION = "dogs-vs-cats-redux-kernels-edition"


class ConfigError(ValueError):
    """params.yaml does not match the dataclass it is loaded into."""


# ---------------------------------------------------------------------------------------------------
# stage sections


@dataclass(frozen=True)
class DemoParams:
    seed: int  # the generator's seed: same seed, byte-identical zip
    train_per_class: int  # cat.N.jpg and dog.N.jpg images each in train.zip
    test_count: int  # N.jpg images in test.zip
    min_side: int  # shortest image side in pixels (each image draws its own size)
    max_side: int  # longest image side in pixels
    mislabel_fraction: float  # images drawn as one class but named as the other (label noise)
    hard_fraction: float  # images with a small, faint or partly hidden subject


@dataclass(frozen=True)
class FetchParams:
    source: str  # "kaggle", "demo", or a path to the competition zip or a folder holding its files
    competition: str  # Kaggle competition slug
    demo: DemoParams  # the synthetic data set written when source is "demo"


@dataclass(frozen=True)
class PrepareParams:
    seed: int  # seed of the train/valid/sample split
    valid_per_class: int  # images per class moved from train to valid (the lesson: 1000)
    sample_train_per_class: int  # images per class in sample/train (linked from train)
    sample_valid_per_class: int  # images per class in sample/valid (linked from valid)
    max_pixels: int  # larger images are rejected as decompression bombs
    workers: int  # processes that decode-check images; 0 = one per CPU core


# ---------------------------------------------------------------------------------------------------
# loading


def load_params(cls: type, section: str, path: str | Path = PARAMS_FILE):
    """Read `section` of the YAML file at `path` into the dataclass `cls`."""
    data = _load(path)
    if section not in data:
        raise ConfigError(f"{path}: section '{section}' is missing")
    return from_dict(cls, data[section], section)


def from_dict(cls: type, data: object, where: str):
    """Build dataclass `cls` from a mapping, checking every key and type; `where` names the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = sorted(set(fields) - set(data))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _convert(hints[name], data[name], f"{where}.{name}") for name in fields})


def _convert(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    # bool is a subclass of int in Python; in a config file `true` for a count is a mistake
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class TrainParams:
    arch: str  # torchvision or timm model name (vgg16, resnet34, timm/convnext_tiny, efficientnet_lite0, ...)
    weights: str  # imagenet | none (random init: the offline demo) | path to a state dict for the arch
    finetune: Literal["head", "dense", "all"]  # what trains: the new layer, the arch's dense block, everything
    image_size: int  # side of the centre crop fed to the network; 0 = the weights' own (224, lite1: 240, ...)
    augment: bool  # random resized crop + horizontal flip on training images
    min_scale: float  # ... the crop covers at least this fraction of the image's area
    freeze_bn: bool  # BatchNorm keeps its pretrained running statistics while the body trains (small data sets)
    head_epochs: int  # fastai's fine_tune: with finetune all, first this many epochs train only the head
    head_lr: float  # ... at this peak lr (on cached activations when feature_cache)
    epochs: int  # passes over the training images (or their cached activations) with `finetune`
    batch_size: int  # images per optimiser step (CUDA: the largest that fits)
    lr: float  # peak learning rate of the one-cycle schedule (head, or the dense block)
    body_lr_factor: float  # finetune: all -> the pretrained body trains at lr * this (discriminative lrs)
    keep: Literal["best", "last"]  # the epoch whose weights are kept: lowest validation log loss, or the last
    weight_decay: float  # AdamW decoupled weight decay
    warmup: float  # fraction of the steps spent warming up to the peak lr
    seed: int  # same seed on CPU -> same weights
    workers: int  # DataLoader worker processes (JPEG decoding); 0 = in the main process
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA when available, else CPU
    feature_cache: bool  # head/dense without augment: train on the frozen layers' cached activations
    compile: bool  # torch.compile the network (CUDA: worth it for long runs; minutes of warm-up)


@dataclass(frozen=True)
class LrFindParams:
    steps: int  # mini-batches in the sweep (fewer when the loss blows up first)
    start_lr: float  # the sweep's first learning rate ...
    end_lr: float  # ... and its last, growing exponentially in between


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: int  # images per forward pass of the frozen layers
    workers: int  # DataLoader worker processes (JPEG decoding)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int  # validation images per forward pass
    workers: int  # DataLoader worker processes
    lesson_clip: float  # the lesson's fixed clip, reported beside the searched one
    clip_max: float  # the clip search tries 0 .. clip_max
    clip_step: float  # ... in steps of this
    temperature_scaling: bool  # also fit a temperature (+ clip); predict applies it when it beats the clip alone
    show_images: int  # images in each diagnostic grid (top losses, most uncertain)


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


@dataclass(frozen=True)
class PredictParams:
    batch_size: int  # images per ONNX Runtime call
    workers: int  # JPEG decode + resize threads; 0 = one per CPU core
    tta: bool  # test-time augmentation: average P(dog) of the image and its mirror (2x the compute)
    clip: Literal["evaluate"] | float  # "evaluate": metrics/evaluate.json's clip; a number: that fixed clip
    provider: Literal["auto", "cpu", "cuda"]  # ONNX Runtime provider; auto: CUDA when really obtained, else CPU
    max_pixels: int  # larger test images are unreadable (decompression bombs), predicted 0.5
    variant: Literal["auto", "fp32", "int8", "fp16"]  # model file; auto: fp16 on CUDA if it passed export, else fp32


@dataclass(frozen=True)
class BlendParams:
    method: Literal["mean", "fit"]  # mean of the members' logits, or weights fitted on validation (>= 0, sum 1)
    folds: int  # the fitted weights' gain is also measured out of sample, by this many folds of validation


@dataclass(frozen=True)
class PackageParams:
    model_name: str  # name in the BentoML model store (`bentoml models list`)
    member: str  # the member served: "best" (lowest validation log loss after calibration) or a member's name


@dataclass(frozen=True)
class ServeParams:
    provider: Literal["auto", "cpu", "cuda"]  # ONNX Runtime provider: auto = CUDA when really obtained
    max_batch_size: int  # adaptive batching: the most images in one forward pass
    max_latency_ms: int  # adaptive batching: the longest a request may wait for its batch
    max_bytes: int  # uploads larger than this get 413
    max_pixels: int  # images with more pixels get 400 (decompression bombs)
    max_batch_images: int  # images in one /classify_batch request
    variant: Literal["auto", "fp32", "int8", "fp16"]  # auto: fp16 on CUDA, int8 on CPU, if they passed export
    threads: int  # ONNX Runtime intra-op threads of each model worker; 0 = one per core
    workers: int  # model service processes, each with its own copy of the model and its own batches


# ---------------------------------------------------------------------------------------------------
# members: the models trained, each the train section with its own overrides

MEMBER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
RESERVED_MEMBERS = {"blend", "onnx"}  # blend: the blend's row in the metrics; onnx: a folder under models/


def member_names(path: str | Path = PARAMS_FILE) -> list[str]:
    """The members of params.yaml, in their order; each name must be usable as a folder name."""
    return list(_members(path))


def load_member(name: str | None, path: str | Path = PARAMS_FILE) -> TrainParams:
    """`members.<name>`'s overrides on top of the train section (`name` None: the train section alone)."""
    data = _load(path)
    if "train" not in data:
        raise ConfigError(f"{path}: section 'train' is missing")
    train = data["train"]
    if name is not None:
        members = _members(path)
        if name not in members:
            raise ConfigError(f"{path}: no member '{name}' in members (there are: {', '.join(members)})")
        if not isinstance(train, dict):
            raise ConfigError(f"train: expected a mapping, got {type(train).__name__}")
        unknown = sorted(set(members[name]) - {f.name for f in dataclasses.fields(TrainParams)})
        if unknown:
            raise ConfigError(f"members.{name}: unknown key(s) {', '.join(unknown)}: a member overrides train's keys")
        train = {**train, **members[name]}
    return from_dict(TrainParams, train, "train" if name is None else f"train + members.{name}")


def _load(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run the stage from the project root")
    return yaml.safe_load(path.read_text()) or {}


def _members(path: str | Path) -> dict[str, dict]:
    members = _load(path).get("members")
    if not isinstance(members, dict) or not members:
        raise ConfigError(f"{path}: 'members' must map each model's name to its overrides of train, e.g. lite0: {{}}")
    for name, overrides in members.items():
        if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name) or name in RESERVED_MEMBERS:
            raise ConfigError(
                f"members: {name!r} is not a usable name: lower-case letters, digits, _ and -, at most 40, "
                f"not {' or '.join(sorted(RESERVED_MEMBERS))}"
            )
        if not isinstance(overrides, dict):
            raise ConfigError(f"members.{name}: expected a mapping of train keys (or {{}}), got {overrides!r}")
    return members
