"""The model: torchvision's VGG16 with a new 2-way head, its weights, freezing and preprocessing.

Shared by `train`, `evaluate` and `export`. Class order is fixed (`cats` = 0, `dogs` = 1, the
alphabetical order of the prepared folders) and stored in every checkpoint, with everything else a
consumer needs to rebuild the model: `load_model("models/model.pt")` needs nothing but the file.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import models
from torchvision.transforms import v2
from tqdm import tqdm

log = logging.getLogger("model")

CLASSES = ("cats", "dogs")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the VGG16 weights were trained with
STD = (0.229, 0.224, 0.225)
WEIGHTS = models.VGG16_Weights.IMAGENET1K_V1
WEIGHTS_FILE = Path(WEIGHTS.url).name  # vgg16-397923af.pth
HEAD = "classifier.6"  # the 1000-way layer that becomes the 2-way head
DENSE = "classifier."  # all fully connected layers


class WeightsError(RuntimeError):
    """Pretrained weights cannot be loaded; the message says what to do."""


def hub_checkpoint_dir() -> Path:
    """Where torchvision caches downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_imagenet_state_dict() -> dict:
    """torchvision's ImageNet VGG16 weights: the cached file if present, else a download."""
    cached = hub_checkpoint_dir() / WEIGHTS_FILE
    if not cached.exists():
        log.info("downloading %s to %s", WEIGHTS.url, cached.parent)
    try:  # reuses the cached file without touching the network
        return WEIGHTS.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise WeightsError(
            f"Cannot download the ImageNet VGG16 weights ({e}). Download {WEIGHTS.url} elsewhere and "
            f"put it at {cached} (or set TORCH_HOME to a folder whose hub/checkpoints/ holds it), or set "
            "train.weights to the path of a VGG16 state dict, or train.weights: none to start from "
            "random weights (the offline demo does)."
        ) from e


def load_state_dict_file(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"train.weights is '{path}', which is not a file: expected a VGG16 state dict (.pth), 'imagenet' or 'none'"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def build_model(weights: str, num_classes: int = len(CLASSES)) -> nn.Module:
    """VGG16 with `weights` ('imagenet', 'none' or a state-dict path) and a new `num_classes` head."""
    model = models.vgg16(weights=None)
    if weights != "none":
        state = load_imagenet_state_dict() if weights == "imagenet" else load_state_dict_file(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsError(f"the weights in '{weights}' do not fit torchvision's VGG16: {e}") from e
    # the new head: same init as torchvision's own classifier layers
    head = nn.Linear(model.classifier[6].in_features, num_classes)
    nn.init.normal_(head.weight, 0, 0.01)
    nn.init.zeros_(head.bias)
    model.classifier[6] = head
    return model


def trainable_prefixes(finetune: str) -> tuple[str, ...]:
    """Which parameters train: the lesson's `head`, the `dense` layers, or `all`."""
    return {"head": (HEAD,), "dense": (DENSE,), "all": ("",)}[finetune]


def param_groups(model: nn.Module, finetune: str, lr: float, conv_lr_factor: float) -> list[dict]:
    """Freeze what `finetune` leaves alone; returns optimiser groups (discriminative lr for `all`)."""
    prefixes = trainable_prefixes(finetune)
    dense, conv = [], []
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(prefixes)
        if p.requires_grad:
            (conv if name.startswith("features.") else dense).append(p)
    groups = [{"params": dense, "lr": lr, "name": "dense"}]
    if conv:  # pretrained conv filters move less than the new layers
        groups.append({"params": conv, "lr": lr * conv_lr_factor, "name": "conv"})
    return groups


def resize_size(image_size: int) -> int:
    """torchvision's ratio for these weights: resize to 256, crop 224."""
    return round(image_size * 256 / 224)


def eval_transform(image_size: int) -> v2.Compose:
    """Exactly the weights' own preprocessing (`VGG16_Weights.IMAGENET1K_V1.transforms()`), any size:
    resize and crop the PIL image (Pillow's antialiased bilinear), then to tensor and normalise."""
    return v2.Compose(
        [
            v2.Resize(resize_size(image_size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def train_transform(image_size: int, augment: bool) -> v2.Compose:
    """Random resized crop and horizontal flip when `augment`, else the eval preprocessing."""
    if not augment:
        return eval_transform(image_size)
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The trained model (eval mode) and its metadata, from `models/model.pt` alone."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 'dvc repro train' first")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = models.vgg16(weights=None)
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), {k: v for k, v in ckpt.items() if k != "model"}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.device is 'cuda' but PyTorch sees no CUDA device: set train.device: auto or cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    # bf16 on CUDA: the tensor cores' fast path, and no loss scaling needed (fp16 would need it)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images (N, C, H, W) go channels_last (the conv kernels' fast layout); activations (N, D) as they are."""
    fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


@torch.no_grad()
def predict_logits(model, loader, device, desc="valid") -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C) as float64, labels (N,)) in loader order."""
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, mininterval=2):
        with autocast(device):
            x = to_device(x, device)
            logits.append(model(x).float().cpu())
        labels.append(y)
    return torch.cat(logits).double().numpy(), torch.cat(labels).numpy()
