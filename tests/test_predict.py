"""predict: a tiny prepared test set through a hand-built ONNX model: every id, sorted, clipped, unreadable
images reported (never dropped), TTA, scoring, and the submission validation."""

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.calibration import Calibration, logit_difference
from pipeline.contract import ModelContract
from pipeline.data import SubmissionError, load_image, make_session, validate_submission
from pipeline.stages import predict
from pipeline.stages.predict import decoded_batches
from tests.conftest import ROOT
from tests.test_data import write_tiny_onnx

SAMPLE_IDS = [3, 1, 10, 2, 4, 5, 6, 7, 8, 11]  # Kaggle's order need not be numeric; 9 has no row
DOGS = {1, 3, 7, 11}  # red images (the tiny model's dogs); the others blue
CORRUPT, REJECTED, MISSING, EXTRA = 4, 5, 6, 9


def photo(dog: bool, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (230, 40, 30) if dog else (30, 40, 230))


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def project(tmp_path):
    """data/prepared like prepare's (one corrupt, one rejected, one missing and one extra test image),
    one member's ONNX folder (models/onnx/m), metrics/blend.json, the demo labels and a params.yaml."""
    prepared = tmp_path / "data" / "prepared"
    test = prepared / "test" / "unknown"
    test.mkdir(parents=True)
    for i in [*SAMPLE_IDS, EXTRA]:
        if i not in (REJECTED, MISSING):
            (test / f"{i}.jpg").write_bytes(jpeg(photo(i in DOGS, (40 + i, 30))))
    whole = (test / f"{CORRUPT}.jpg").read_bytes()
    (test / f"{CORRUPT}.jpg").write_bytes(whole[: len(whole) // 2])  # truncated: opens, fails to decode
    (prepared / "rejected" / "test").mkdir(parents=True)
    (prepared / "rejected" / "test" / f"{REJECTED}.jpg").write_bytes(b"not a jpeg")
    (prepared / "rejected.csv").write_text(f"path,reason\nrejected/test/{REJECTED}.jpg,UnidentifiedImageError: x\n")
    (prepared / "sample_submission.csv").write_text("id,label\n" + "".join(f"{i},0.5\n" for i in SAMPLE_IDS))
    write_tiny_onnx(tmp_path / "models" / "onnx" / "m", image_size=16)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "blend.json").write_text(json.dumps({"weights": {"m": 1.0}, "accuracy": 0.9, "clip": 0.03}))
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{i},{int(i in DOGS)}\n" for i in SAMPLE_IDS))
    return tmp_path


def run_predict(project, labels="labels.csv", **params):
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    values["predict"].update({"batch_size": 3, "workers": 2, "clip": 0.05, "provider": "cpu", **params})
    (project / "params.yaml").write_text(yaml.safe_dump(values))
    predict.main([
        "--onnx", str(project / "models" / "onnx"), "--data", str(project / "data" / "prepared"),
        "--blend", str(project / "metrics" / "blend.json"), "--labels", str(project / labels),
        "--submission", str(project / "submissions" / "submission.csv"),
        "--metrics", str(project / "metrics" / "predict.json"), "--params", str(project / "params.yaml"),
        "--member-logits", str(project / "predictions" / "test"),
    ])  # fmt: skip
    text = (project / "submissions" / "submission.csv").read_text()
    return text, pd.read_csv(io.StringIO(text)), json.loads((project / "metrics" / "predict.json").read_text())


def test_every_expected_id_sorted_and_clipped(project, caplog):
    with caplog.at_level(logging.INFO):
        text, df, metrics = run_predict(project)
    assert text.splitlines()[0] == "id,label"
    assert df["id"].tolist() == sorted(SAMPLE_IDS)  # numeric order: 10 after 8, and no extra 9
    unreadable = {CORRUPT, REJECTED, MISSING}
    for i, label in zip(df["id"], df["label"], strict=True):
        expected = 0.5 if i in unreadable else 0.95 if i in DOGS else 0.05  # confident, so clipped
        assert label == expected, i
    assert metrics["n"] == len(SAMPLE_IDS) and metrics["clip"] == 0.05 and metrics["members"]["m"]["provider"] == "cpu"
    assert "images_per_second" not in metrics and metrics["tta"] is False
    # the unreadable ids are reported with the reason, in the metrics and the log
    reasons = {u["id"]: u["reason"] for u in metrics["unreadable"]}
    assert set(reasons) == unreadable and metrics["n_unreadable"] == 3
    assert "not a readable image" in reasons[CORRUPT]
    assert reasons[REJECTED] == "rejected by prepare: UnidentifiedImageError: x"
    assert reasons[MISSING].startswith("no image") and reasons[MISSING].endswith(f"{MISSING}.jpg")
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(f"test image {i} unreadable" in w for w in warnings for i in unreadable) == 3
    assert any("not in the sample submission" in w and str(EXTRA) in w for w in warnings)
    # scored against the hidden labels: the 7 readable images right, the 3 unreadable at 0.5
    readable = len(SAMPLE_IDS) - 3
    cats_among_unreadable = len(unreadable - DOGS)  # 0.5 counts as "cat"
    assert metrics["accuracy"] == pytest.approx((readable + cats_among_unreadable) / len(SAMPLE_IDS))
    assert metrics["log_loss"] == pytest.approx((readable * -np.log(0.95) + 3 * np.log(2)) / len(SAMPLE_IDS))
    assert not list((project / "submissions").glob(".*tmp"))  # the temporary file was renamed


def test_clip_from_the_blend_metrics(project):
    _, df, metrics = run_predict(project, clip="evaluate")
    assert metrics["clip"] == 0.03
    assert set(df["label"]) == {0.03, 0.5, 0.97}


def test_temperature_from_the_blend_metrics_when_it_beat_the_clip(project):
    chosen = {"clip": 0.03, "calibration": "temperature", "temperature": 1000.0, "temperature_clip": 0.01}
    (project / "metrics" / "blend.json").write_text(json.dumps({"weights": {"m": 1.0}, **chosen}))
    _, df, metrics = run_predict(project, clip="evaluate")
    assert metrics["temperature"] == 1000.0 and metrics["clip"] == 0.01
    assert df["label"].between(0.49, 0.51).all()  # T = 1000 flattens every P(dog) to ~0.5
    dogs, cats = df[df["id"].isin(DOGS)]["label"], df[~df["id"].isin(DOGS)]["label"]
    assert dogs.min() > 0.5 > cats[cats != 0.5].max()  # ... keeping the order


def test_two_members_are_blended_by_their_weights_each_with_its_own_preprocessing(project):
    """The submission's logit is the weighted sum of the members' logits (each from its own image size), then the
    blend's calibration; a member missing from models/onnx is a clear error."""
    write_tiny_onnx(project / "models" / "onnx" / "n", image_size=24, gain=-1.0)  # another size, disagrees
    weights = {"m": 0.75, "n": 0.25}
    blend = {
        "weights": weights,
        "clip": 0.001,
        "calibration": "temperature",
        "temperature": 2.0,
        "temperature_clip": 0.0,
    }
    (project / "metrics" / "blend.json").write_text(json.dumps(blend))
    _, df, metrics = run_predict(project, clip="evaluate", tta=True)
    assert set(metrics["members"]) == {"m", "n"} and metrics["members"]["n"]["weight"] == 0.25
    z = 0.0
    for name, w in weights.items():
        onnx_dir = project / "models" / "onnx" / name
        meta, (session, _) = ModelContract.read(onnx_dir), make_session(onnx_dir, "cpu")
        x = meta.preprocess(load_image(project / "data" / "prepared" / "test" / "unknown" / "7.jpg", 10**6))
        own = meta.logits(session, x[None], tta=True)[0]
        written = pd.read_csv(project / "predictions" / "test" / f"{name}.csv").set_index("id")["logit"]
        assert written.dtype == np.float64 and written[7] == own  # each member's own test logits, exactly
        z += w * own
    assert float(df.loc[df["id"] == 7, "label"].iloc[0]) == pytest.approx(1 / (1 + np.exp(-z / 2.0)), abs=1e-6)
    (project / "metrics" / "blend.json").write_text(json.dumps({**blend, "weights": {"m": 0.5, "gone": 0.5}}))
    with pytest.raises(SystemExit, match=r"models/onnx/gone/model.onnx not found"):
        run_predict(project, clip="evaluate")


def test_the_logit_difference_scaled_is_softmax_of_the_scaled_logits():
    logits = np.array([[2.0, -3.0], [0.0, 0.0], [-40.0, 45.0], [1.0, 1.5]])
    for t in (0.5, 1.0, 2.7):
        expected = torch.softmax(torch.from_numpy(logits / t), 1)[:, 1].numpy()
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy().astype(np.float32)  # what the ONNX model gives
        scaled = 1 / (1 + np.exp(-logit_difference(probs, 1) / t))  # what Calibration.p_dog and predict compute
        np.testing.assert_allclose(scaled, expected, rtol=1e-5, atol=1e-7)


def test_without_labels_nothing_is_scored(project, caplog):
    with caplog.at_level(logging.INFO, logger="predict"):
        _, df, metrics = run_predict(project, labels="no-such-labels.csv")
    assert "accuracy" not in metrics and "log_loss" not in metrics and len(df) == len(SAMPLE_IDS)
    assert any("not scored" in r.message for r in caplog.records)


def test_cuda_that_is_not_there_fails(project):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        _, used = make_session(project / "models" / "onnx" / "m", "auto")
        if used == "cuda":
            pytest.skip("CUDA works on this machine")
    with pytest.raises(SystemExit, match="set the provider to auto or cpu"):
        run_predict(project, provider="cuda")


def test_tta_averages_the_logits_of_the_image_and_its_mirror(project):
    """As evaluate's predict_logits(tta=True) does: the validation calibration then fits the submission."""
    meta = ModelContract.read(project / "models" / "onnx" / "m")
    calibrated = lambda tta, t: meta.calibrated(Calibration(tta, t, 0.0))  # noqa: E731
    session, _ = make_session(project / "models" / "onnx" / "m", "cpu")
    half = np.zeros((1, 3, 16, 16), np.float32)
    half[:, 0, :, :8], half[:, 2, :, 8:] = 2.0, 2.0  # red on the left, blue on the right
    x = np.concatenate([half, half[..., ::-1], np.zeros_like(half)])
    plain = calibrated(False, None).predict(session, x)
    assert plain[0] > 0.99 and plain[1] < 0.01 and plain[2] == pytest.approx(0.5)
    lopsided = np.zeros((2, 3, 16, 16), np.float32)
    lopsided[0, 0, :, :8], lopsided[0, 2, :, 8:] = 0.3, 0.05  # strong red left, weak blue right
    lopsided[1, 0, :, :8], lopsided[1, 2, :, 8:] = 0.02, 0.2
    plain = calibrated(False, None).predict(session, lopsided)
    mirrored = calibrated(False, None).predict(session, np.ascontiguousarray(lopsided[..., ::-1]))
    z = (np.log(plain) - np.log1p(-plain) + np.log(mirrored) - np.log1p(-mirrored)) / 2
    tta = calibrated(True, None).predict(session, lopsided)
    np.testing.assert_allclose(tta, 1 / (1 + np.exp(-z)), atol=1e-5)
    scaled = calibrated(True, 2.0).predict(session, lopsided)
    np.testing.assert_allclose(scaled, 1 / (1 + np.exp(-z / 2)), atol=1e-5)
    assert np.abs(1 / (1 + np.exp(-z)) - (plain + mirrored) / 2).max() > 1e-3  # not the mean of probabilities


def test_decoded_batches_keep_order_and_size():
    with ThreadPoolExecutor(3) as pool:
        got = list(decoded_batches(list(range(10)), lambda i: i * i, 4, pool, ahead=2))
    assert [b for b, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [r for _, r in got] == [[0, 1, 4, 9], [16, 25, 36, 49], [64, 81]]


# --- validate_submission ----------------------------------------------------------------------------

IDS = [1, 2, 3, 4]


def good() -> pd.DataFrame:
    return pd.DataFrame({"id": IDS, "label": [0.05, 0.95, 0.5, 0.2]})


def test_a_valid_submission_passes():
    assert list(good()["label"][:2]) == [0.05, 0.95]  # at exactly the clip bounds
    assert validate_submission(good(), IDS, clip=0.05) is None
    assert validate_submission(good().iloc[::-1], IDS, clip=0.05) is None  # Kaggle does not need them sorted
    # the same frame with one label a hair past the bound is refused: the checks above did run
    past = good().assign(label=[0.05, 0.95 + 1e-6, 0.5, 0.2])
    with pytest.raises(SubmissionError, match=r"1 labels outside \[0.05, 0.95\] \(ids 2\)"):
        validate_submission(past, IDS, clip=0.05)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda df: df[df["id"] != 3], r"1 missing ids: 3.*3 rows where Kaggle expects 4"),
        (lambda df: pd.concat([df, df.iloc[[1]]]), r"1 duplicated ids: 2"),
        (lambda df: df.replace({"id": {4: 2}}), r"duplicated ids: 2; 1 missing ids: 4"),
        (lambda df: pd.concat([df, pd.DataFrame({"id": [99], "label": [0.5]})]), r"ids not in the sample.*: 99"),
        (lambda df: df.assign(label=[0.05, np.nan, 0.5, 0.2]), r"1 labels NaN or not a number \(ids 2\)"),
        (lambda df: df.assign(label=["0.05", "dog", "0.5", "0.2"]), r"NaN or not a number \(ids 2\)"),
        (lambda df: df.assign(label=[0.01, 0.95, 0.5, 1.2]), r"2 labels outside \[0.05, 0.95\] \(ids 1, 4\)"),
        (lambda df: df.assign(id=["1", "2", "x", "4"]), r"not integers: x"),
        (lambda df: df.rename(columns={"label": "is_dog"}), r"header must be id,label, not id,is_dog"),
        (lambda df: df[["label", "id"]], r"header must be id,label"),
    ],
)
def test_a_wrong_submission_is_rejected(break_it, message):
    with pytest.raises(SubmissionError, match=message):
        validate_submission(break_it(good()), IDS, clip=0.05)


def test_the_variant_param_picks_the_model_file(project):
    onnx_dir = project / "models" / "onnx" / "m"
    assert run_predict(project)[2]["members"]["m"]["variant"] == "fp32"  # auto, only fp32 exported
    int8 = write_tiny_onnx(project / "int8", image_size=16, gain=-4.0) / "model.onnx"  # cats and dogs swapped
    (onnx_dir / "model.int8.onnx").write_bytes(int8.read_bytes())
    _, df, metrics = run_predict(project)
    assert metrics["members"]["m"]["variant"] == "fp32" and metrics["accuracy"] > 0.5  # auto on CPU: fp32, never int8
    _, df, metrics = run_predict(project, variant="int8")
    assert metrics["members"]["m"]["variant"] == "int8" and metrics["accuracy"] < 0.5  # by name: the int8 file ran
    with pytest.raises(SystemExit, match="add fp16 to export.variants"):
        run_predict(project, variant="fp16")
