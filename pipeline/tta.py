"""Test-time augmentation: which views of a photo the model sees, whose logits are averaged (`predict.tta`).

Not a stage: `evaluate` (torch, on the validation set), `predict` (ONNX Runtime, on the test set) and the service
make the same views, so the calibration fitted on validation fits the submission and the service. `predict.tta`:
false, the weights' own preprocessing alone (short side to resize_size, centre crop); true or "flip", and its
mirror; "flip+close", and a closer crop (short side to CLOSE_ZOOM x resize_size) and its mirror, chosen on the 22k
kit's validation split by `bench/tta_check.py` (bench/README.md). numpy and Pillow only: the bento ships it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

CLOSE_ZOOM = 1.15  # the closer crop's short side, over resize_size (bench/tta_check.py's "close" view)
Setting = bool | Literal["flip", "flip+close"]  # predict.tta's type
SETTINGS = (False, True, "flip", "flip+close")


def check(tta) -> None:
    if tta not in SETTINGS or (tta is not False and tta is not True and not isinstance(tta, str)):
        raise ValueError(f"TTA {tta!r} is not one of {list(SETTINGS)}")


def mirrored(tta) -> bool:
    """Whether each crop's mirror is a view too."""
    check(tta)
    return tta is not False


def crop_sizes(tta, resize_size: int) -> tuple[int, ...]:
    """The short side each crop resizes the photo to before its centre crop: (resize_size,) or with the closer one."""
    check(tta)
    return (resize_size, round(CLOSE_ZOOM * resize_size)) if tta == "flip+close" else (resize_size,)


def view_count(tta) -> int:
    """Forward passes per photo."""
    return len(crop_sizes(tta, 1)) * (2 if mirrored(tta) else 1)


def describe(tta) -> str:
    check(tta)
    return {False: "no TTA", True: "flip TTA", "flip": "flip TTA", "flip+close": "flip + close-crop TTA"}[tta]


def mean_over_views(run, x: np.ndarray, tta) -> np.ndarray:
    """The mean over the views of `run`'s output, for x (N, 3, H, W) (one crop) or (N, K, 3, H, W) (K crops,
    `crop_sizes`' order); each crop's mirror is added when `mirrored(tta)`. One call of `run` on all the views: they
    fill the same batch."""
    n, k = len(x), (x.shape[1] if x.ndim == 5 else 1)
    x = x.reshape(n * k, *x.shape[-3:])  # photo by photo, its crops together
    if mirrored(tta):
        x = np.concatenate([x, x[..., ::-1]])  # (2 * N * K, 3, H, W)
    out = run(np.ascontiguousarray(x, dtype=np.float32))  # (V * N * K, ...) in x's order
    return out.reshape(-1, n, k, *out.shape[1:]).mean(axis=(0, 2))  # (mirror, N, K, ...) -> (N, ...)
