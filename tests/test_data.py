"""data: safe decoding of any image, preprocessing equal to torchvision's, the ONNX folder's metadata and providers.

`write_tiny_onnx` builds a small ONNX folder by hand (no exporter, instant) for the predict tests too.
"""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pipeline.contract import ModelContract
from pipeline.data import (
    MODEL_FILE,
    VARIANT_FILES,
    ImageError,
    ModelError,
    auto_variant,
    decoded_pixels,
    gpu_present,
    load_image,
    make_session,
    open_model,
    preprocess,
)
from pipeline.model import eval_transform, preprocessing

VGG16 = preprocessing("vgg16")  # 224 px, resize 256, bilinear, ImageNet mean and std


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- load_image -------------------------------------------------------------------------------------


def test_loads_path_and_bytes_fully_decoded(tmp_path):
    data = jpeg(noise(40, 30))
    (tmp_path / "a.jpg").write_bytes(data)
    for source in (data, tmp_path / "a.jpg", str(tmp_path / "a.jpg")):
        img = load_image(source, max_pixels=10_000)
        assert img.mode == "RGB" and img.size == (40, 30)
        assert np.asarray(img).shape == (30, 40, 3)  # usable after the file is closed


def test_truncated_jpeg_is_an_image_error():
    whole = jpeg(noise(64, 64))
    truncated = whole[: len(whole) * 2 // 3]
    Image.open(io.BytesIO(truncated))  # opens fine: only decoding finds the damage
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(truncated, max_pixels=10_000)


def test_not_an_image_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"<html>404</html>", max_pixels=10_000)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "missing.jpg", max_pixels=10_000)


def test_too_many_pixels_is_refused_before_decoding(monkeypatch):
    with pytest.raises(ImageError, match="40x30 pixels is over the limit of 1000"):
        load_image(jpeg(noise(40, 30)), max_pixels=1000)
    # Pillow's own bomb limit raises DecompressionBombError, which is not an OSError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="DecompressionBombError"):
        load_image(jpeg(noise(40, 30)), max_pixels=10**9)


def test_a_jpeg_decodes_at_reduced_scale_and_the_pixel_limit_counts_what_is_decoded():
    """draft_size: a 2000 x 1200 JPEG decodes at 1/4 (short side 300 >= 256), so it passes a limit its full size is
    over; a PNG cannot be drafted, and decoded_pixels says so from its header (issue 24, item 4)."""
    big = noise(100, 60).resize((2000, 1200))
    img = load_image(jpeg(big), max_pixels=200_000, draft_size=256)
    assert img.size == (500, 300) and img.mode == "RGB"
    assert decoded_pixels(jpeg(big), 200_000, draft_size=256) == 500 * 300
    with pytest.raises(ImageError, match="2000x1200 pixels is over the limit"):
        load_image(jpeg(big), max_pixels=200_000)  # no draft: the full size counts
    with pytest.raises(ImageError, match="2000x1200 pixels is over the limit"):
        decoded_pixels(png(big), 200_000, draft_size=256)
    # close to a full decode resized down: what the model sees barely changes
    full = np.asarray(load_image(jpeg(big), max_pixels=10**7).resize((500, 300), Image.BILINEAR), dtype=float)
    assert np.abs(np.asarray(img, dtype=float) - full).mean() < 3


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("L", (128, 128, 128)),
        ("LA", (255, 255, 255)),  # fully transparent: white
        ("RGBA", (255, 255, 255)),
        ("P", (255, 255, 255)),  # palette with a transparent index
        ("CMYK", None),
        ("I;16", (200, 200, 200)),  # 16-bit grey 51400: top byte 200, not clipped to 255
    ],
)
def test_any_mode_becomes_rgb(mode, expected):
    if mode == "L":
        img = Image.new("L", (8, 8), 128)
    elif mode == "LA":
        img = Image.new("LA", (8, 8), (0, 0))
    elif mode == "RGBA":
        img = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    elif mode == "P":
        img = Image.new("P", (8, 8), 1)
        img.putpalette([0, 0, 0, 255, 0, 0])
        img.info["transparency"] = 1
    elif mode == "CMYK":
        img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    else:
        img = Image.fromarray(np.full((8, 8), 51400, dtype=np.uint16))
    data = jpeg(img) if mode == "CMYK" else png(img)
    out = load_image(data, max_pixels=10_000)
    assert out.mode == "RGB" and out.size == (8, 8)
    pixel = out.getpixel((4, 4))
    if expected is None:
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60
    else:
        assert pixel == expected


def test_semi_transparent_pixels_are_composited_on_white():
    out = load_image(png(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), max_pixels=100)
    assert out.getpixel((0, 0)) == (127, 127, 127)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = load_image(jpeg(img, exif=exif.tobytes()), max_pixels=10_000)
    assert out.size == (20, 40)
    r, _, b = out.getpixel((10, 5))  # the blue half is now on top
    assert b > 200 and r < 60


# --- preprocess -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vgg16", "efficientnet_lite0"])  # bilinear, ImageNet stats; bicubic, 0.5
@pytest.mark.parametrize("image_size", [32, 128, 224])
@pytest.mark.parametrize("size", [(500, 375), (311, 460), (224, 224), (57, 33), (1000, 667), (37, 37)])
def test_preprocess_equals_the_weights_own_transform(arch, image_size, size):
    img = noise(*size, seed=size[0])
    pre = preprocessing(arch, image_size)
    ours = preprocess(img, pre["image_size"], pre["resize_size"], pre["mean"], pre["std"], pre["interpolation"])
    theirs = eval_transform(pre)(img).numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, image_size, image_size)
    assert np.abs(ours - theirs).max() <= 1e-6


# --- the ONNX folder --------------------------------------------------------------------------------


def tiny_metadata(image_size: int, **params) -> dict[str, str]:
    """export's metadata for a tiny model; `params`: its training params (train's section, as model.pt holds it)."""
    return {
        "classes": json.dumps(["cats", "dogs"]),
        "image_size": str(image_size),
        "resize_size": str(preprocessing("vgg16", image_size)["resize_size"]),
        "interpolation": "bilinear",
        "arch": "tiny",
        "layout": "NCHW",
        "mean": json.dumps(list(VGG16["mean"])),
        "std": json.dumps(list(VGG16["std"])),
        "weights": "none",
        "params_hash": "0" * 64,
        "run_key": "tiny",
        "params": json.dumps({"finetune": "head", "weights": "none", **params}, sort_keys=True),
        "input_name": "image",
        "output_name": "probs",
    }


def write_tiny_onnx(dest, image_size: int = 16, gain: float = 4.0, **params):
    """An ONNX folder like export's: `image` (N, 3, S, S) -> `probs` (N, 2) with the same metadata.

    P(dog) = sigmoid(gain * (mean red - mean blue) over the LEFT half of the normalised image): red
    images are dogs, blue ones cats, and a mirror image changes the answer (for the TTA test)."""
    dest.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((1, 1, image_size, image_size), np.float32)
    mask[..., : image_size // 2] = 2.0  # mean over the left half
    weights = np.array([[0, gain], [0, 0], [0, -gain]], np.float32)  # (3, 2): logit_dog = gain * (R - B)
    nodes = [
        helper.make_node("Mul", ["image", "mask"], ["masked"]),
        helper.make_node("ReduceMean", ["masked", "axes"], ["means"], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["means", "weights"], ["logits"]),  # (N, 2)
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2])],
        [
            numpy_helper.from_array(mask, "mask"),
            numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    helper.set_model_props(model, tiny_metadata(image_size, **params))
    onnx.checker.check_model(model)
    onnx.save(model, dest / MODEL_FILE)
    return dest


def test_read_metadata_types_the_values(tmp_path):
    meta = ModelContract.read(write_tiny_onnx(tmp_path / "onnx", image_size=32))
    assert meta.classes == ("cats", "dogs") and meta.image_size == 32 and meta.resize_size == 36
    assert meta.mean == VGG16["mean"] and meta.std == VGG16["std"] and meta.layout == "NCHW"
    assert meta.interpolation == "bilinear" and meta.arch == "tiny"
    assert (meta.input_name, meta.output_name) == ("image", "probs")
    assert meta.calibration is None  # chosen on validation after export: predict and package attach it


def test_read_metadata_says_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="run 'dvc repro export' first"):
        ModelContract.read(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not an ONNX model"):
        ModelContract.read(tmp_path)
    model = onnx.load(write_tiny_onnx(tmp_path / "onnx") / MODEL_FILE)
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "onnx" / MODEL_FILE)
    with pytest.raises(ModelError, match="lacks metadata arch, classes"):
        ModelContract.read(tmp_path / "onnx")
    onnx.helper.set_model_props(model, {**tiny_metadata(16), "layout": "NHWC"})
    onnx.save(model, tmp_path / "onnx" / MODEL_FILE)
    with pytest.raises(ModelError, match="not this pipeline's NCHW image -> probs model"):
        ModelContract.read(tmp_path / "onnx")
    onnx.helper.set_model_props(model, {**tiny_metadata(16), "classes": '["cats", "birds"]'})
    onnx.save(model, tmp_path / "onnx" / MODEL_FILE)
    with pytest.raises(ModelError, match="lack 'dogs'"):
        ModelContract.read(tmp_path / "onnx")


def test_make_session_reports_the_provider_it_really_got(tmp_path, caplog):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    session, used = make_session(onnx_dir, "cpu")
    assert used == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="data"):
        session, used = make_session(onnx_dir, "auto")
    assert used == ("cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu")
    if used == "cpu":  # a GPU whose CUDA libraries fail: the fallback is said; no GPU: not asked; "cuda" refuses
        asked = gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers()
        assert any("running on CPU" in r.message for r in caplog.records) == asked
        with pytest.raises(ModelError, match="set the provider to auto or cpu"):
            make_session(onnx_dir, "cuda")
    else:
        assert make_session(onnx_dir, "cuda")[1] == "cuda"


def test_make_session_on_a_broken_folder(tmp_path):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    model = onnx.load(onnx_dir / MODEL_FILE)
    model.ir_version = 14  # newer than onnxruntime 1.31 reads
    onnx.save(model, onnx_dir / MODEL_FILE)
    with pytest.raises(ModelError, match="Run 'dvc repro export' again"):
        make_session(onnx_dir, "cpu")


def test_variants_are_opened_by_name_and_auto_picks_int8_on_cpu(tmp_path, caplog):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    with caplog.at_level(logging.INFO, logger="data"):
        assert open_model(onnx_dir, "cpu")[1:] == ("cpu", "fp32")  # only fp32 exported
    assert any("variant fp32 on cpu" in r.message for r in caplog.records)
    with pytest.raises(ModelError, match="add int8 to export.variants"):
        make_session(onnx_dir, "cpu", "int8")
    with pytest.raises(ValueError, match="variant must be one of"):
        make_session(onnx_dir, "cpu", "int4")
    (onnx_dir / VARIANT_FILES["int8"]).write_bytes((onnx_dir / MODEL_FILE).read_bytes())  # stands in for int8
    (onnx_dir / VARIANT_FILES["fp16"]).write_bytes((onnx_dir / MODEL_FILE).read_bytes())
    assert (auto_variant(onnx_dir, cuda=True), auto_variant(onnx_dir, cuda=False)) == ("fp16", "int8")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="data"):
        session, used, variant = open_model(onnx_dir, "auto", threads=1)
    assert (used, variant) == ("cuda", "fp16") if used == "cuda" else (used, variant) == ("cpu", "int8")
    fallbacks = [r for r in caplog.records if "CUDA provider not obtained" in r.message]
    # once, and only where a GPU is present (without one, CUDA is not even asked for)
    assert len(fallbacks) == (
        used == "cpu" and gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers()
    )
    assert session.get_session_options().intra_op_num_threads == 1
    assert open_model(onnx_dir, "cpu", "fp16")[2] == "fp16"  # asked for by name: given, even on CPU


@pytest.mark.parametrize(
    "system, machine, flavour",
    [
        ("Linux", "x86_64", "onnxruntime-gpu"),
        ("Windows", "AMD64", "onnxruntime-gpu"),
        ("Darwin", "arm64", "onnxruntime"),  # onnxruntime-gpu has no macOS or Linux aarch64 wheels
        ("Linux", "aarch64", "onnxruntime"),
        ("Windows", "ARM64", "onnxruntime"),
    ],
)
def test_exactly_one_onnxruntime_is_declared_for_each_platform(system, machine, flavour):
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    env = {"platform_system": system, "platform_machine": machine, "sys_platform": system.lower()}
    chosen = [
        r.name
        for r in map(Requirement, pyproject["project"]["dependencies"])
        if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(env))
    ]
    assert chosen == [flavour]


def test_a_cpu_machine_never_asks_for_cuda(tmp_path):
    """onnxruntime-gpu asked for CUDA without a GPU prints a red 'Failed to load library
    libonnxruntime_providers_cuda.so'; auto asks only where the driver reports a GPU."""
    if gpu_present():
        pytest.skip("a GPU is present: CUDA is asked for, as it should be")
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")
    code = f"from pipeline.data import open_model; print(open_model({str(onnx_dir)!r}, 'auto')[1:])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "('cpu', 'fp32')"
    assert "cuda" not in done.stderr.lower(), done.stderr  # no CUDA library was even tried
    with pytest.raises(ModelError, match="the NVIDIA driver reports no GPU"):
        make_session(onnx_dir, "cuda")
