"""Shared image and model I/O for the stages and the BentoML service: decode, preprocess, open the ONNX model.

Not a stage: `prepare`, `export`, `predict`, `package` and the service import it. No torch here,
so the service runs on onnxruntime, numpy and Pillow alone. `load_image` decodes untrusted bytes safely
(pixel limit from the header, JPEGs at reduced scale, full decode, EXIF rotation, any mode to RGB;
`decoded_pixels` counts what it would decode); `preprocess` is `pipeline.model.eval_transform`
in numpy (the tests hold it to 1e-6 of torchvision's); `make_session` opens the ONNX folder written by `export`
(pipeline/contract.py reads the model's contract from it); `open_model` picks the
variant file (fp32, int8, fp16) for the device. `validate_submission`
checks a submission against Kaggle's `sample_submission.csv` (for `predict` and `submit`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile
from PIL import Image, ImageOps

log = logging.getLogger("data")

MODEL_FILE = "model.onnx"  # inside the ONNX folder, beside its external data file model.onnx.data
# the variants `export` can write into the ONNX folder (model.onnx, the fp32 reference, always), each a
# complete model with the same inputs, outputs and metadata
VARIANT_FILES = {"fp32": MODEL_FILE, "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
# export's verdict on each variant it tried ({variant: {passed, reason, accuracy, log_loss, ...}}), in the ONNX
# folder beside the models, so predict and the service (which has only the folder) can say why one is missing
VARIANTS_RECORD = "variants.json"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, too large. The message says which."""


MAX_IR_VERSION = 13  # the newest ONNX IR version onnxruntime(-gpu) 1.31 loads


class ModelError(RuntimeError):
    """The ONNX folder or the execution provider is not what was asked for; the message says what to do."""


# preprocess scales the short side up or down to ~256 px: a 1 x 20,000 strip (tiny in bytes and pixels)
# would become 256 x 5,120,000 (3.9 GB). Panoramas are ~10:1 at most.
MAX_ASPECT = 50


def load_image(source: bytes | str | os.PathLike, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """A fully decoded RGB image from a path or bytes; `ImageError` if it is unusable or decodes to over `max_pixels`.

    `draft_size`: a JPEG is decoded at the most reduced of 1/1, 1/2, 1/4, 1/8 scale whose short side is still at
    least this (Pillow's `draft`, libjpeg's DCT scaling): preprocessing's resize_size, so the model sees about what a
    full decode resized down gives, and a 48 MP photo costs 0.75 MP to decode instead of 48 (issue 24, item 4)."""
    with opened_image(source, max_pixels, draft_size) as img:
        try:
            img.load()  # a truncated JPEG opens fine and fails only here
            return to_rgb(ImageOps.exif_transpose(img))  # phone photos are stored sideways; EXIF says so
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{image_name(source)} is not a readable image ({e.__class__.__name__}: {e})") from e


def decoded_pixels(source: bytes | str | os.PathLike, max_pixels: int, draft_size: int | None = None) -> int:
    """The pixels `load_image` would decode, from the header alone; `ImageError` as `load_image` would raise it."""
    with opened_image(source, max_pixels, draft_size) as img:
        return img.width * img.height


def image_name(source: bytes | str | os.PathLike) -> str:
    return "image bytes" if isinstance(source, bytes) else str(source)


@contextlib.contextmanager
def opened_image(source: bytes | str | os.PathLike, max_pixels: int, draft_size: int | None):
    """The image opened (its header read, nothing decoded), drafted to `draft_size` and checked against
    `max_pixels` and MAX_ASPECT: what `load_image` decodes and `decoded_pixels` counts."""
    name = image_name(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    # DecompressionBombError (Pillow's own limit, twice its warning size) is not an OSError
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name} is not a readable image ({e.__class__.__name__}: {e})") from e
    with img:
        full = img.size
        if draft_size and img.format == "JPEG":
            img.draft(img.mode, (draft_size, draft_size))  # sets the size the decoder will give
        if img.width * img.height > max_pixels:
            decodes = "" if img.size == full else f" (decoded at reduced scale: {img.width}x{img.height})"
            raise ImageError(f"{name}: {full[0]}x{full[1]} pixels{decodes} is over the limit of {max_pixels}")
        if max(img.size) > MAX_ASPECT * min(img.size):
            raise ImageError(
                f"{name}: {full[0]}x{full[1]} pixels is a strip, not a photo (longer than "
                f"{MAX_ASPECT}:1); resizing its short side would blow it up to a huge image"
            )
        yield img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (L, LA, P, RGBA, CMYK, I;16, ...) as RGB; transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip at 255; keep the top 8 bits
        grey = np.asarray(img).astype(np.uint16) >> 8
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # the weights' interpolation -> Pillow's


def preprocess(
    img: Image.Image,
    image_size: int,
    resize_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str = "bilinear",
) -> np.ndarray:
    """`eval_transform` without torch: resize the short side to `resize_size`, centre-crop `image_size`,
    scale to [0, 1] and normalise. Returns float32 (3, image_size, image_size)."""
    # torchvision's v2.Resize on a PIL image: short side = size, long side = int(size * long / short),
    # then Pillow's resize (antialiased when shrinking) with the weights' filter, with Pillow's defaults
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), RESAMPLE[interpolation], reducing_gap=None)
    if min(new_w, new_h) < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than image_size {image_size}")
    # torchvision's CenterCrop rounds the offsets
    top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    x = np.asarray(img, dtype=np.float32) / np.float32(255)  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)


@functools.cache
def gpu_present() -> bool:
    """Whether the NVIDIA driver sees a GPU (libcuda's cuInit + cuDeviceGetCount, no torch needed).

    onnxruntime-gpu lists CUDA among its providers on any machine; asked for it without a GPU, it prints a
    red "Failed to load library libonnxruntime_providers_cuda.so" and falls back to CPU. Asking only where
    the driver reports a device keeps a CPU machine's log clean."""
    name = "nvcuda.dll" if sys.platform == "win32" else ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(name)
    except OSError:  # no NVIDIA driver installed: macOS, most laptops, CPU servers
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def read_variants_record(onnx_dir: str | os.PathLike) -> dict:
    """export's verdict on each variant it tried, {variant: {passed, reason, ...}}; {} for an older export."""
    path = Path(onnx_dir) / VARIANTS_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def missing_variant_error(onnx_dir: str | os.PathLike, variant: str) -> ModelError:
    """Why a variant's file is not in the folder: export refused it (and why), or was never asked for it."""
    path = Path(onnx_dir) / VARIANT_FILES[variant]
    verdict = read_variants_record(onnx_dir).get(variant)
    if verdict is not None and not verdict["passed"]:
        return ModelError(
            f"{variant} was refused by export's check, so {path.name} was not kept: {verdict['reason']}. "
            "Use variant fp32 or auto, or change the export bounds and run 'dvc repro export' (and 'dvc repro "
            "package' for the service)"
        )
    hint = "" if variant == "fp32" else f" (add {variant} to export.variants)"
    return ModelError(f"{path} not found: run 'dvc repro export' first{hint}")


def make_session(
    onnx_dir: str | os.PathLike, provider: str, variant: str = "fp32", threads: int = 0
) -> tuple[ort.InferenceSession, str]:
    """An ONNX Runtime session on `provider` (auto | cpu | cuda) for one variant's file (fp32 | int8 | fp16),
    and the provider it really got ("cuda"|"cpu"). `threads`: intra-op threads, 0 = ONNX Runtime's default.

    CUDA is asked for only where a GPU is present (`gpu_present`); even then onnxruntime-gpu falls back to
    CPU without raising when CUDA or cuDNN cannot be loaded (it only logs), so the answer comes from
    `session.get_providers()`: `cuda` then fails, `auto` logs the fallback."""
    if provider not in ("auto", "cpu", "cuda"):
        raise ValueError(f"provider must be auto, cpu or cuda, not {provider!r}")
    if variant not in VARIANT_FILES:
        raise ValueError(f"variant must be one of {', '.join(VARIANT_FILES)}, not {variant!r}")
    path = Path(onnx_dir) / VARIANT_FILES[variant]
    if not path.is_file():
        raise missing_variant_error(onnx_dir, variant)
    has_cuda_provider = CUDA in ort.get_available_providers()
    if provider == "cuda" and not has_cuda_provider:
        raise ModelError(
            f"provider is 'cuda' but this onnxruntime has no CUDA provider ({ort.get_available_providers()}): "
            "install onnxruntime-gpu, or set the provider to auto or cpu"
        )
    if provider == "cuda" and not gpu_present():
        raise ModelError(
            "provider is 'cuda' but the NVIDIA driver reports no GPU on this machine (libcuda missing or no "
            "device): run where a GPU is, or set the provider to auto or cpu"
        )
    want_cuda = provider != "cpu" and has_cuda_provider and gpu_present()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=[CUDA, CPU] if want_cuda else [CPU])
    except (Fail, InvalidGraph, InvalidProtobuf, NoSuchFile) as e:  # e.g. IR too new, model.onnx.data missing
        raise ModelError(f"ONNX Runtime {ort.__version__} cannot load {path}: {e}. Run 'dvc repro export' again") from e
    used = "cuda" if CUDA in session.get_providers() else "cpu"
    if provider == "cuda" and used != "cuda":
        raise ModelError(
            "provider is 'cuda' but ONNX Runtime could not start CUDA (see its message above: usually CUDA/cuDNN "
            "libraries it cannot load): fix that, or set the provider to auto or cpu"
        )
    if provider == "auto" and want_cuda and used != "cuda":
        log.warning("CUDA provider not obtained (see ONNX Runtime's message above): running on CPU")
    return session, used


def auto_variant(onnx_dir: str | os.PathLike, cuda: bool, cpu_variant: str = "int8") -> str:
    """The variant `auto` picks among the files export kept (those that passed its check): fp16 on CUDA;
    on CPU `cpu_variant`, int8 for the service's speed (bench/README.md) or fp32 for predict;
    else fp32."""
    preferred = "fp16" if cuda else cpu_variant
    return preferred if (Path(onnx_dir) / VARIANT_FILES[preferred]).is_file() else "fp32"


def open_model(
    onnx_dir: str | os.PathLike, provider: str, variant: str = "auto", threads: int = 0, cpu_variant: str = "int8"
) -> tuple[ort.InferenceSession, str, str]:
    """`make_session` with `variant` auto resolved for the provider really obtained: (session, provider, variant).
    `cpu_variant`: what auto means on CPU (int8 for the service, fp32 for predict's submission)."""
    if variant != "auto":
        return (*make_session(onnx_dir, provider, variant, threads), variant)
    cuda = provider != "cpu" and CUDA in ort.get_available_providers() and gpu_present()
    chosen = auto_variant(onnx_dir, cuda, cpu_variant)
    session, used = make_session(onnx_dir, provider, chosen, threads)
    if used != "cuda" and chosen != auto_variant(onnx_dir, False, cpu_variant):  # CUDA fell back (logged)
        chosen = auto_variant(onnx_dir, False, cpu_variant)
        session, used = make_session(onnx_dir, "cpu", chosen, threads)
    log.info("ONNX Runtime: variant %s on %s", chosen, used)
    return session, used, chosen


# --- the submission file -------------------------------------------------------------------------


class SubmissionError(ValueError):
    """A submission Kaggle would reject or score wrongly; the message lists what is wrong."""


def read_sample_ids(path: Path) -> np.ndarray:
    """The ids Kaggle expects, from sample_submission.csv (`id,label`)."""
    if not path.exists():
        raise SubmissionError(f"{path} not found: run 'dvc repro prepare' first")
    try:
        sample = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path} is not a CSV file ({e.__class__.__name__}: {e})") from e
    if list(sample.columns) != ["id", "label"] or not pd.api.types.is_integer_dtype(sample["id"]) or sample.empty:
        raise SubmissionError(f"{path} is not Kaggle's sample submission (integer id, label): run 'dvc repro prepare'")
    return sample["id"].to_numpy()


def _few(values) -> str:
    """The first few of `values`, for an error message."""
    values = list(values)
    return ", ".join(map(str, values[:5])) + (" ..." if len(values) > 5 else "")


def validate_submission(df: pd.DataFrame, sample_ids, clip: float) -> None:
    """Raise SubmissionError unless `df` has header id,label, exactly the sample's ids once each, and
    every label a number in [clip, 1 - clip]."""
    if list(df.columns) != ["id", "label"]:
        raise SubmissionError(f"the header must be id,label, not {','.join(map(str, df.columns))}")
    problems = []
    ids = pd.to_numeric(df["id"], errors="coerce")
    if ids.isna().any() or (ids != ids.round()).any():
        problems.append(f"ids that are not integers: {_few(df['id'][ids.isna() | (ids != ids.round())])}")
    duplicated = sorted(set(ids[ids.duplicated()].dropna().astype(int)))
    if duplicated:
        problems.append(f"{len(duplicated)} duplicated ids: {_few(duplicated)}")
    expected, got = set(int(i) for i in sample_ids), set(ids.dropna().astype(int))
    if expected - got:
        problems.append(f"{len(expected - got)} missing ids: {_few(sorted(expected - got))}")
    if got - expected:
        problems.append(f"{len(got - expected)} ids not in the sample submission: {_few(sorted(got - expected))}")
    if len(df) != len(expected):
        problems.append(f"{len(df)} rows where Kaggle expects {len(expected)}")
    labels = pd.to_numeric(df["label"], errors="coerce")
    if labels.isna().any():
        problems.append(f"{int(labels.isna().sum())} labels NaN or not a number (ids {_few(df['id'][labels.isna()])})")
    outside = (labels < clip - 1e-12) | (labels > 1 - clip + 1e-12)
    if outside.any():
        problems.append(f"{int(outside.sum())} labels outside [{clip}, {1 - clip}] (ids {_few(df['id'][outside])})")
    if problems:
        raise SubmissionError("; ".join(problems))
