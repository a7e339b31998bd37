"""export: the real dynamo exporter on a small random-weights CNN: parity with PyTorch, metadata round trip,
dynamic batch, IR version, a failed check that keeps the previous export, and the int8 and fp16 variants the
stage writes, keeps or refuses. The bounds a variant is judged by are tested in tests/test_variants.py."""

import copy
import hashlib
import json
import logging
import shutil

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from pipeline.contract import ModelContract
from pipeline.data import (
    MODEL_FILE,
    VARIANT_FILES,
    VARIANTS_RECORD,
    ModelError,
    make_session,
    open_model,
)
from pipeline.model import CLASSES, preprocessing
from pipeline.stages import export
from pipeline.stages.export import MAX_IR_VERSION, ExportError, check_export, export_onnx
from tests.conftest import ROOT

SIZE = 16


def tiny_model(gain: float = 40) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    ).eval()
    with torch.no_grad():
        model[-1].weight *= gain  # confident outputs: parity near P = 0.5 would prove little
    return model


def onnx_metadata(meta: dict) -> dict[str, str]:
    """The metadata export writes for a checkpoint."""
    return ModelContract.from_checkpoint(meta).onnx_props()


def checkpoint_meta(**params) -> dict:
    """models/model.pt's keys other than the weights, as `load_model` returns them."""
    return {
        **preprocessing("vgg16", SIZE),
        "arch": "tiny",
        "classes": CLASSES,
        "weights": "none",
        "params": {"image_size": SIZE, "lr": 0.03, **params},
        "run_key": "0123456789abcdef",
        "history": [],
    }


def images(n: int) -> list[Image.Image]:
    """Noisy images of varied size and colour."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 40, (30 + i, 25 + 2 * i, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, meta = tiny_model(), checkpoint_meta()
    dest = tmp_path_factory.mktemp("export") / "onnx"
    ir_version = export_onnx(model, SIZE, dest, onnx_metadata(meta), opset=20)
    yield dest, model, meta, ir_version
    shutil.rmtree(dest.parent)  # 537 MB: gone once this module is done, not at the end of the session


def test_onnx_matches_pytorch(exported):
    dest, model, meta, _ = exported
    diff = check_export(dest, model, images(6), onnx_metadata(meta), tolerance=1e-4)
    assert diff <= 1e-5
    assert sorted(f.name for f in dest.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_export_is_the_same_bytes_wherever_it_is_written(exported, tmp_path):
    # the exporter records stack traces with absolute paths; export drops them so a model does not vary by
    # checkout (nor ship local paths)
    onnx_dir, model, meta, _ = exported
    export_onnx(model, SIZE, tmp_path / "elsewhere", onnx_metadata(meta), opset=20)
    assert (tmp_path / "elsewhere" / MODEL_FILE).read_bytes() == (onnx_dir / MODEL_FILE).read_bytes()
    graph = onnx.load(onnx_dir / MODEL_FILE, load_external_data=False).graph
    assert not [p for n in graph.node for p in n.metadata_props if "stack_trace" in p.key]


def test_metadata_round_trip(exported):
    dest, _, meta, _ = exported
    got = ModelContract.read(dest)
    assert got.classes == CLASSES and got.layout == "NCHW"
    pre = preprocessing("vgg16", SIZE)
    assert (got.image_size, got.resize_size, got.interpolation) == (SIZE, pre["resize_size"], "bilinear")
    assert got.mean == pre["mean"] and got.std == pre["std"] and got.weights == "none"
    assert got.params_hash == hashlib.sha256(json.dumps(meta["params"], sort_keys=True).encode()).hexdigest()
    assert got.run_key == meta["run_key"] and (got.input_name, got.output_name) == ("image", "probs")
    assert onnx_metadata(checkpoint_meta(lr=0.1))["params_hash"] != got.params_hash
    assert got == ModelContract.from_checkpoint(meta)  # one contract, written by export and read back whole


def test_graph_is_valid_with_a_dynamic_batch_and_softmax_output(exported):
    dest, model, _, ir_version = exported
    onnx.checker.check_model(str(dest / MODEL_FILE), full_check=True)
    proto = onnx.load(dest / MODEL_FILE, load_external_data=False)
    assert proto.ir_version == ir_version <= MAX_IR_VERSION
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["probs"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic: any batch size
    session, _ = make_session(dest, "cpu")
    for n in (1, 3, 7):
        x = np.random.default_rng(n).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)
        probs = session.run(["probs"], {"image": x})[0]
        assert probs.shape == (n, 2)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
        with torch.no_grad():
            expected = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_check_fails_when_onnx_and_pytorch_disagree(exported):
    dest, model, meta, _ = exported
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[-1].bias += torch.tensor([0.5, -0.5])
    with pytest.raises(ExportError, match="disagree: max"):
        check_export(dest, other, images(4), onnx_metadata(meta), tolerance=1e-4)
    with pytest.raises(ExportError, match="metadata read back"):
        check_export(dest, model, images(4), onnx_metadata(checkpoint_meta(lr=0.1)), tolerance=1e-4)


REFUSE = dict(max_log_loss_ratio=-1.0, log_loss_slack=-1.0)  # no log loss is within these: int8 is refused


def write_project(tmp_path, **export_params):
    """data/prepared/valid with a few images, and a params.yaml."""
    for k, img in enumerate(images(6)):
        folder = tmp_path / "data" / "prepared" / "valid" / ("cats", "dogs")[k % 2]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{('cat', 'dog')[k % 2]}.{k}.jpg")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["export"].update({"parity_images": 4, "variants": ["fp32"], **export_params})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return [
        "--model", str(tmp_path / "models" / "model.pt"), "--data", str(tmp_path / "data" / "prepared"),
        "--out", str(tmp_path / "models" / "onnx"), "--metrics", str(tmp_path / "metrics" / "export.json"),
        "--params", str(tmp_path / "params.yaml"),
    ]  # fmt: skip


def test_main_writes_the_folder_and_metrics_and_keeps_them_on_a_failed_check(tmp_path, monkeypatch):
    argv = write_project(tmp_path)
    monkeypatch.setattr(export, "load_model", lambda path, device: (tiny_model(), checkpoint_meta()))
    export.main(argv)
    out = tmp_path / "models" / "onnx"
    assert sorted(f.name for f in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert not (tmp_path / "models" / ".onnx.tmp").exists()
    metrics = json.loads((tmp_path / "metrics" / "export.json").read_text())
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["parity_images"] == 4 and metrics["opset"] == 20
    assert metrics["ir_version"] <= MAX_IR_VERSION and metrics["variants"] == {}
    assert not any("seconds" in k or "bytes" in k for k in metrics)  # quality figures, none that varies run to run
    before = (out / "model.onnx").read_bytes()

    def wrong(*args, **kwargs):
        raise ExportError("ONNX Runtime and PyTorch disagree: max |delta P| = 0.3 > export.tolerance 0.0001")

    monkeypatch.setattr(export, "check_export", wrong)
    with pytest.raises(SystemExit, match="export failed its check, .* is unchanged"):
        export.main(argv)
    assert (out / "model.onnx").read_bytes() == before


def test_int8_and_fp16_variants_are_written_checked_and_picked(tmp_path, monkeypatch):
    loose = dict(max_log_loss_ratio=100.0, max_accuracy_drop=1.0)  # the variants pass whatever the CPU's kernels
    argv = write_project(tmp_path, variants=["fp32", "int8", "fp16"], calibration_images=4, **loose)
    # a model of modest confidence: int8 rounding of logits x40 would move its log loss by more than 0.01
    monkeypatch.setattr(export, "load_model", lambda path, device: (tiny_model(gain=2), checkpoint_meta()))
    export.main(argv)
    out = tmp_path / "models" / "onnx"
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [*VARIANT_FILES.values(), "model.onnx.data", VARIANTS_RECORD]
    )
    for variant, name in VARIANT_FILES.items():
        proto = onnx.load(out / name)
        assert {p.key: p.value for p in proto.metadata_props} == onnx_metadata(checkpoint_meta())
        assert proto.ir_version <= MAX_IR_VERSION
        session, used = make_session(out, "cpu", variant)  # ONNX Runtime's CPU provider runs all three
        assert used == "cpu" and session.get_inputs()[0].type == "tensor(float)"
    int8 = onnx.load(out / VARIANT_FILES["int8"]).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.node}  # QDQ format
    softmax = [n for n in int8.node if n.op_type == "Softmax"]  # stays float: int8 would round small P to 0
    assert len(softmax) == 1 and softmax[0].output[0] == int8.output[0].name
    fp16 = onnx.load(out / VARIANT_FILES["fp16"])
    weights = [t for t in fp16.graph.initializer if len(t.dims) >= 2]  # conv and linear weights
    assert weights and {t.data_type for t in weights} == {onnx.TensorProto.FLOAT16}
    metrics = json.loads((tmp_path / "metrics" / "export.json").read_text())
    scores = json.loads((out / VARIANTS_RECORD).read_text())  # with each file's bytes; the metrics without them
    assert {v: {k: x for k, x in s.items() if k != "bytes"} for v, s in scores.items()} == metrics["variants"]
    assert set(scores) == {"fp32", "int8", "fp16"} and metrics["refused"] == []
    for s in scores.values():
        assert s["passed"] and s["reason"] is None and s["bytes"] > 0 and s["n"] == 6
    fp32 = (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    assert scores["fp32"]["bytes"] == fp32 > scores["int8"]["bytes"]
    assert open_model(out, "cpu")[1:] == ("cpu", "int8")  # auto on CPU for the service: int8
    assert open_model(out, "cpu", cpu_variant="fp32")[1:] == ("cpu", "fp32")  # ... for predict: fp32
    assert open_model(out, "cpu", "fp16")[2] == "fp16"


def test_a_refused_variant_is_not_kept_and_fp32_is_used_in_its_place(tmp_path, monkeypatch, caplog):
    argv = write_project(tmp_path, variants=["fp32", "int8"], calibration_images=4, **REFUSE)
    monkeypatch.setattr(export, "load_model", lambda path, device: (tiny_model(gain=2), checkpoint_meta()))
    with caplog.at_level(logging.INFO, logger="export"):
        export.main(argv)
    out = tmp_path / "models" / "onnx"
    assert sorted(f.name for f in out.iterdir()) == ["model.onnx", "model.onnx.data", VARIANTS_RECORD]
    metrics = json.loads((tmp_path / "metrics" / "export.json").read_text())
    assert metrics["refused"] == ["int8"]
    int8 = metrics["variants"]["int8"]
    assert not int8["passed"] and "x fp32's" in int8["reason"] and "the larger of -1.0x and +-1.0" in int8["reason"]
    last = caplog.records[-1].getMessage()
    assert last.startswith("kept fp32 and refused int8 (log loss") and "use fp32 in its place" in last
    assert open_model(out, "auto")[1:] == ("cpu", "fp32")  # auto never picks a refused variant
    with pytest.raises(ModelError, match=r"int8 was refused by export's check.*log loss .*over the bound"):
        open_model(out, "cpu", "int8")  # asked for by name: an error that says why


def test_strict_fails_the_stage_on_a_refused_variant_and_cleans_up(tmp_path, monkeypatch):
    strict = dict(variants=["fp32", "int8"], calibration_images=4, **REFUSE, strict=True)
    argv = write_project(tmp_path, **strict)
    monkeypatch.setattr(export, "load_model", lambda path, device: (tiny_model(gain=2), checkpoint_meta()))
    with pytest.raises(SystemExit, match="int8 is worse than fp32 on the validation set: .*export.strict: false"):
        export.main(argv)
    assert not (tmp_path / "models" / "onnx").exists()
    assert not (tmp_path / "models" / ".onnx.tmp").exists()  # 600 MB for VGG16: removed unless asked to keep
    argv = write_project(tmp_path, **strict, keep_failed=True)
    with pytest.raises(SystemExit, match=r"\.onnx\.tmp kept to inspect"):
        export.main(argv)
    assert (tmp_path / "models" / ".onnx.tmp" / "model.onnx").exists()
