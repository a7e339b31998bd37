"""pipeline.calibration: the one path from a model's softmax to the submitted P(dog), and package's choice of it."""

import dataclasses
import json

import numpy as np
import pytest

from pipeline.calibration import Calibration, CalibrationError, sigmoid
from pipeline.config import load_params
from pipeline.contract import ModelContract
from pipeline.data import make_session
from pipeline.params.predict import PredictParams
from pipeline.stages.package import served_calibration, submission_members
from tests.conftest import ROOT
from tests.test_data import write_tiny_onnx

TEMPERATURE = {"calibration": "temperature", "temperature": 1.25, "temperature_clip": 0.004, "clip": 0.01}


def test_a_number_is_a_fixed_clip_and_evaluate_reads_what_was_chosen(tmp_path):
    assert Calibration.chosen(0.02, True, tmp_path / "absent.json") == Calibration(True, None, 0.02)
    metrics = tmp_path / "evaluate.json"
    metrics.write_text(json.dumps(TEMPERATURE))
    assert Calibration.chosen("evaluate", False, metrics) == Calibration(False, 1.25, 0.004)
    metrics.write_text(json.dumps({**TEMPERATURE, "calibration": "clip"}))
    assert Calibration.chosen("evaluate", False, metrics) == Calibration(False, None, 0.01)


def test_a_missing_or_incomplete_record_says_what_to_run(tmp_path):
    with pytest.raises(CalibrationError, match=r"absent.json not found: run 'dvc repro', or set predict.clip"):
        Calibration.chosen("evaluate", True, tmp_path / "absent.json")
    metrics = tmp_path / "evaluate.json"
    metrics.write_text(json.dumps({"calibration": "temperature", "temperature": 1.1}))
    with pytest.raises(CalibrationError, match=r"lacks 'temperature_clip' \(not written by evaluate or blend\)"):
        Calibration.chosen("evaluate", True, metrics)
    with pytest.raises(CalibrationError, match=r"lacks 'clip': run 'dvc repro package' again"):
        Calibration.from_dict({"tta": True})
    with pytest.raises(CalibrationError, match=r"clip 0.5 is outside \[0, 0.5\)"):
        Calibration(False, None, 0.5)
    with pytest.raises(CalibrationError, match=r"temperature 0.0 is not positive"):
        Calibration(False, 0.0, 0.0)


def test_the_stored_record_reads_back_the_same():
    for cal in (Calibration(True, 0.82, 0.018), Calibration(False, None, 0.0)):
        assert Calibration.from_dict(json.loads(json.dumps(cal.as_dict()))) == cal
    assert "temperature" not in Calibration(False, None, 0.01).as_dict()  # BentoML's metadata refuses null


def test_p_dog_scales_then_clips_without_overflow():
    z = np.array([-1000.0, -2.0, 0.0, 2.0, 1000.0])
    assert np.all(np.isfinite(sigmoid(z))) and sigmoid(z)[0] == 0 and sigmoid(z)[-1] == 1
    p = Calibration(False, 2.0, 0.01).p_dog(z)
    np.testing.assert_allclose(p[1:4], 1 / (1 + np.exp(-z[1:4] / 2)))
    assert p[0] == 0.01 and p[-1] == 0.99


def test_flip_tta_is_the_mean_of_the_image_and_its_mirrors_logits(tmp_path):
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")  # a model whose answer changes with a mirror
    session, _ = make_session(onnx_dir, "cpu")
    meta = ModelContract.read(onnx_dir)
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    plain, mirrored = meta.logits(session, x, False), meta.logits(session, x[..., ::-1], False)
    assert not np.allclose(plain, mirrored)
    np.testing.assert_allclose(meta.logits(session, x, True), (plain + mirrored) / 2, rtol=1e-6)
    cal = Calibration(True, 0.8, 0.02)
    np.testing.assert_allclose(meta.calibrated(cal).predict(session, x), cal.p_dog((plain + mirrored) / 2), rtol=1e-6)


def test_package_serves_the_blends_calibration_only_when_the_blend_is_this_member_alone(tmp_path):
    own = tmp_path / "members" / "a"
    own.mkdir(parents=True)
    (own / "evaluate.json").write_text(json.dumps({**TEMPERATURE, "temperature": 0.9}))
    blend = tmp_path / "blend.json"
    predict = dataclasses.replace(
        load_params(PredictParams, "predict", ROOT / "params.yaml"), clip="evaluate", tta=True
    )

    blend.write_text(json.dumps({**TEMPERATURE, "temperature": 1.5, "weights": {"a": 1.0, "b": 0.0}}))
    assert submission_members("a", blend) == ["a"]
    assert served_calibration(predict, own, "a", blend) == Calibration(True, 1.5, 0.004)  # the submission's

    blend.write_text(json.dumps({**TEMPERATURE, "temperature": 1.5, "weights": {"a": 0.6, "b": 0.4}}))
    assert submission_members("a", blend) == ["a", "b"]
    assert served_calibration(predict, own, "a", blend) == Calibration(True, 0.9, 0.004)  # the member's own
    assert submission_members(None, None) == ["model"]  # no blend: the model is the submission
