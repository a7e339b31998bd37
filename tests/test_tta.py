"""pipeline/tta.py: the views `predict.tta` averages, made alike by evaluate (torch), predict (ONNX Runtime) and the
service, so the calibration fitted on validation fits the submission."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.calibration import Calibration, CalibrationError
from pipeline.config import ConfigError, load_params
from pipeline.contract import ModelContract
from pipeline.data import load_image, make_session, preprocess
from pipeline.model import build_model, eval_transform, predict_logits, preprocessing
from pipeline.params.predict import PredictParams
from pipeline.stages.evaluate import CropsTransform, views_transform
from pipeline.tools.submit import tta_note
from pipeline.tta import CLOSE_ZOOM, crop_sizes, describe, mean_over_views, view_count
from tests.conftest import ROOT
from tests.test_data import noise, write_tiny_onnx


def test_each_setting_names_its_crops_and_views():
    assert crop_sizes(False, 256) == crop_sizes(True, 256) == crop_sizes("flip", 256) == (256,)
    assert crop_sizes("flip+close", 256) == (256, round(CLOSE_ZOOM * 256)) == (256, 294)
    assert [view_count(t) for t in (False, True, "flip", "flip+close")] == [1, 2, 2, 4]
    assert describe("flip+close") == "flip + close-crop TTA" and describe(True) == describe("flip") == "flip TTA"
    assert (tta_note(False), tta_note(True), tta_note("flip+close")) == ("", " tta", " tta=flip+close")  # make submit
    for bad in ("close", 1, 0, None, "Flip"):
        with pytest.raises(ValueError, match="is not one of"):
            crop_sizes(bad, 256)
        with pytest.raises(CalibrationError, match="is not one of"):
            Calibration(bad, None, 0.01)


@pytest.mark.parametrize("bad", ["close", 2, "yes"])
def test_predict_params_refuse_a_tta_that_is_not_a_setting(tmp_path, bad):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["predict"]["tta"] = bad
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"predict\.tta"):
        load_params(PredictParams, "predict", tmp_path / "params.yaml")
    params["predict"]["tta"] = "flip+close"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_params(PredictParams, "predict", tmp_path / "params.yaml").tta == "flip+close"


def test_flip_and_close_is_the_mean_logit_of_both_crops_and_their_mirrors(tmp_path):
    """ONNX Runtime (predict and the service): x (N, K, 3, H, W), one call, the mean of the four views' logits."""
    onnx_dir = write_tiny_onnx(tmp_path / "onnx")  # a model whose answer changes with a mirror
    session, _ = make_session(onnx_dir, "cpu")
    meta = ModelContract.read(onnx_dir)
    x = np.random.default_rng(0).normal(size=(3, 2, 3, 16, 16)).astype(np.float32)
    views = [meta.logits(session, v, False) for v in (x[:, 0], x[:, 0, ..., ::-1], x[:, 1], x[:, 1, ..., ::-1])]
    assert not np.allclose(views[0], views[2]) and not np.allclose(views[0], views[1])
    np.testing.assert_allclose(meta.logits(session, x, "flip+close"), np.mean(views, axis=0), rtol=1e-6)
    np.testing.assert_allclose(meta.logits(session, x[:, 0], "flip"), np.mean(views[:2], axis=0), rtol=1e-6)
    cal = Calibration("flip+close", 0.8, 0.02)
    np.testing.assert_allclose(meta.calibrated(cal).predict(session, x), cal.p_dog(np.mean(views, axis=0)), rtol=1e-6)
    calls = []
    mean_over_views(lambda v: calls.append(v.shape) or np.zeros(len(v)), x, "flip+close")
    assert calls == [(12, 3, 16, 16)]  # all the views in one batch


def test_torch_averages_the_same_views():
    """evaluate's predict_logits on (B, K, 3, H, W): the mean over the crops and their mirrors."""
    torch.manual_seed(0)
    model = build_model("vgg16", "none").eval()
    x, labels = torch.randn(2, 2, 3, 32, 32), torch.tensor([0, 1])
    per_crop = [predict_logits(model, [(x[:, k], labels)], torch.device("cpu"), tta="flip")[0] for k in range(2)]
    both, y = predict_logits(model, [(x, labels)], torch.device("cpu"), tta="flip+close")
    np.testing.assert_allclose(both, (per_crop[0] + per_crop[1]) / 2, atol=1e-5)
    assert not np.allclose(per_crop[0], per_crop[1], atol=1e-4) and list(y) == [0, 1]


def contract_of(pre: dict, tta) -> ModelContract:
    """The contract of a model with preprocessing `pre`, calibrated with `tta` (as predict and the service get it)."""
    plain = ModelContract(classes=("cats", "dogs"), **{"arch": "x", **pre}, weights="none", params_hash="", run_key="")
    return plain.calibrated(Calibration(tta, None, 0.0))


@pytest.mark.parametrize("arch", ["vgg16", "efficientnet_lite0"])  # bilinear, ImageNet stats; bicubic, 0.5
@pytest.mark.parametrize("size", [(500, 375), (311, 460), (224, 224)])
def test_the_crops_are_the_same_in_evaluate_and_in_predict(arch, size):
    """evaluate's torchvision crops and predict's (and the service's) Pillow + numpy crops agree, the close one too."""
    img = noise(*size, seed=size[0])
    pre = preprocessing(arch, 224)
    ours = contract_of(pre, "flip+close").inputs(img)
    theirs = CropsTransform(pre, "flip+close")(img).numpy()
    assert ours.shape == theirs.shape == (2, 3, 224, 224) and np.abs(ours - theirs).max() <= 1e-6
    close = preprocess(img, 224, round(CLOSE_ZOOM * pre["resize_size"]), pre["mean"], pre["std"], pre["interpolation"])
    assert np.array_equal(ours[1], close) and not np.allclose(ours[0], ours[1])
    # one crop: exactly today's preprocessing, (3, H, W), for false and flip
    assert isinstance(views_transform(pre, True), type(eval_transform(pre)))
    assert contract_of(pre, True).inputs(img).shape == (3, 224, 224)


def test_a_jpeg_decodes_to_the_largest_crops_size(tmp_path):
    """predict and the service decode a JPEG at reduced scale (libjpeg's DCT scaling): never below the closer crop's
    short side, so that crop is not upscaled from a smaller draft."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1800, 1100), (200, 30, 30)).save(path, quality=90)
    one, two = crop_sizes("flip", 256), crop_sizes("flip+close", 256)
    assert min(load_image(path, 10**8, max(one)).size) == 275  # 1/4 scale: 275 >= 256
    assert min(load_image(path, 10**8, max(two)).size) == 550  # 275 < 294: 1/2 scale
