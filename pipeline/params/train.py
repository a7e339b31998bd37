"""The train, features and lr_find sections, and the members: each member is train with its overrides."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import (
    PARAMS_FILE,
    ConfigError,
    above,
    at_least,
    from_dict,
    interval,
    load_yaml,
    matching,
    text,
    zero_or_at_least,
)


@dataclass(frozen=True)
class TrainParams:
    arch: str = text()  # torchvision or timm model name (vgg16, resnet34, timm/convnext_tiny, efficientnet_lite0, ...)
    weights: str = text()  # imagenet | none (random init: the offline demo) | path to a state dict for the arch
    finetune: Literal["head", "dense", "all"]  # what trains: the new layer, the arch's dense block, everything
    image_size: int = zero_or_at_least(32)  # side of the network's centre crop; 0: the weights' own (224, lite1 240)
    augment: bool  # random resized crop + horizontal flip on training images
    min_scale: float = interval("(0, 1]")  # ... the crop covers at least this fraction of the image's area
    frozen_groups: int = at_least(0)  # finetune all: the body's first this many layer groups (stem, early stages) stay
    # frozen; their backward pass at the highest resolution is the costliest part of a CPU training step
    freeze_bn: bool  # BatchNorm keeps its pretrained running statistics while the body trains (small data sets)
    head_epochs: int = at_least(0)  # fastai's fine_tune: with finetune all, first this many epochs train only the head
    head_lr: float = above(0)  # ... at this peak lr (on cached activations when feature_cache)
    epochs: int = at_least(1)  # passes over the training images (or their cached activations) with `finetune`
    epoch_images: int = at_least(0)  # an epoch on images draws at most this many (a new draw each epoch); 0: all
    batch_size: int = at_least(1)  # images per optimiser step (CUDA: the largest that fits)
    lr: float = above(0)  # peak learning rate of the one-cycle schedule (head, or the dense block)
    body_lr_factor: float = interval("(0, 1]")  # finetune: all -> the pretrained body trains at lr * this
    keep: Literal["best", "last"]  # the epoch whose weights are kept: lowest validation log loss, or the last
    refit: bool  # then train again on train + valid up to that epoch: the submitted model (validated: the first)
    weight_decay: float = interval("[0, 1)")  # AdamW decoupled weight decay
    warmup: float = interval("[0, 1)")  # fraction of the steps spent warming up to the peak lr
    seed: int = at_least(0)  # same seed on CPU -> same weights
    workers: int = at_least(0)  # DataLoader worker processes (JPEG decoding); 0 = in the main process
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA when available, else CPU
    feature_cache: bool  # head/dense without augment: train on the frozen layers' cached activations
    compile: bool  # torch.compile the network (CUDA: worth it for long runs; minutes of warm-up)
    precision: Literal["auto", "fp32", "bf16"]  # features and training; auto: bf16 on CUDA and on CPUs with native
    # bf16 (AVX512_BF16 or AMX), else fp32. evaluate, export and predict always compute in fp32 on CPU
    nproc: int = at_least(1)  # processes on this host (CUDA: one per GPU); above 1: train runs under torchrun
    nnodes: int = at_least(1)  # hosts; above 1: each runs the train stage, meeting at rdzv_endpoint
    rdzv_endpoint: str = matching(r"|[A-Za-z0-9.\[\]:-]+:\d+", "'' or host:port")  # nnodes > 1: torchrun's c10d

    def conflict(self) -> str | None:
        processes = self.nproc * self.nnodes
        if self.batch_size % processes:
            return (
                f"batch_size ({self.batch_size}) must be a multiple of the {processes} processes (nproc x nnodes): "
                "it is the global batch, each process takes an equal share"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            return "nnodes > 1 needs rdzv_endpoint: host:port of the first host, reachable from every host"
        return None


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: int = at_least(1)  # images per forward pass of the frozen layers
    workers: int = at_least(0)  # DataLoader worker processes (JPEG decoding)


@dataclass(frozen=True)
class LrFindParams:
    steps: int = at_least(1)  # mini-batches in the sweep (fewer when the loss blows up first)
    start_lr: float = above(0)  # the sweep's first learning rate ...
    end_lr: float = above(0)  # ... and its last, growing exponentially in between

    def conflict(self) -> str | None:
        if self.end_lr <= self.start_lr:
            return f"end_lr ({self.end_lr}) must be > start_lr ({self.start_lr})"
        return None


# ---------------------------------------------------------------------------------------------------
# members: the models trained, each the train section with its own overrides

MEMBER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
RESERVED_MEMBERS = {"blend", "onnx"}  # blend: the blend's row in the metrics; onnx: a folder under models/


def member_names(path: str | Path = PARAMS_FILE) -> list[str]:
    """The members of params.yaml, in their order; each name must be usable as a folder name."""
    return list(_members(load_yaml(path), path))


def load_member(name: str | None, path: str | Path = PARAMS_FILE) -> TrainParams:
    """`members.<name>`'s overrides on top of the train section (`name` None: the train section alone)."""
    data = load_yaml(path)
    if "train" not in data:
        raise ConfigError(f"{path}: section 'train' is missing")
    train = data["train"]
    if name is not None:
        members = _members(data, path)
        if name not in members:
            raise ConfigError(f"{path}: no member '{name}' in members (there are: {', '.join(members)})")
        if not isinstance(train, dict):
            raise ConfigError(f"{path}: train: expected a mapping, got {type(train).__name__}")
        unknown = sorted(set(members[name]) - {f.name for f in dataclasses.fields(TrainParams)})
        if unknown:
            raise ConfigError(
                f"{path}: members.{name}: unknown key(s) {', '.join(unknown)}: a member overrides train's keys"
            )
        train = {**train, **members[name]}
    return from_dict(TrainParams, train, f"{path}: train" if name is None else f"{path}: train + members.{name}")


def _members(data: dict, path: str | Path) -> dict[str, dict]:
    """params.yaml's `members` (`data`, read from `path`), each name checked."""
    members = data.get("members")
    if not isinstance(members, dict) or not members:
        raise ConfigError(f"{path}: 'members' must map each model's name to its overrides of train, e.g. lite0: {{}}")
    for name, overrides in members.items():
        if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name) or name in RESERVED_MEMBERS:
            raise ConfigError(
                f"{path}: members: {name!r} is not a usable name: lower-case letters, digits, _ and -, at most 40, "
                f"not {' or '.join(sorted(RESERVED_MEMBERS))}"
            )
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: members.{name}: expected a mapping of train keys (or {{}}), got {overrides!r}")
    return members
