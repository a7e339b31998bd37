"""model: head replacement, freezing, preprocessing, and the real torchvision weight loading."""

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from pipeline.model import WEIGHTS, WEIGHTS_FILE, WeightsError, build_model, eval_transform, param_groups


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return build_model("none")


def test_head_is_replaced_by_a_two_way_layer(vgg):
    head = vgg.classifier[6]
    assert (head.in_features, head.out_features) == (4096, 2)
    assert vgg(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize(
    "finetune, trainable",
    [
        ("head", {"classifier.6.weight", "classifier.6.bias"}),
        ("dense", {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}),
        ("all", None),
    ],
)
def test_freezing(vgg, finetune, trainable):
    groups = param_groups(vgg, finetune, lr=1e-3, conv_lr_factor=0.1)
    names = {n for n, p in vgg.named_parameters() if p.requires_grad}
    if trainable is None:  # everything trains; conv layers at the lower, discriminative lr
        assert names == {n for n, _ in vgg.named_parameters()}
        assert [(g["name"], g["lr"]) for g in groups] == [("dense", 1e-3), ("conv", pytest.approx(1e-4))]
        assert sum(len(g["params"]) for g in groups) == len(list(vgg.parameters()))
    else:
        assert names == trainable
        assert [g["name"] for g in groups] == ["dense"] and len(groups[0]["params"]) == len(trainable)


def test_preprocessing_equals_torchvisions_for_the_weights():
    rng = np.random.default_rng(0)
    for size in [(500, 375), (311, 460), (224, 224)]:
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ours = eval_transform(224)(img)
        theirs = WEIGHTS.transforms()(img)
        assert ours.shape == theirs.shape == (3, 224, 224)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_weights_come_from_the_torch_hub_cache(torch_home, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    torch.manual_seed(1)
    state = models.vgg16(weights=None).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(state, torch_home / WEIGHTS_FILE)
    model = build_model("imagenet")
    torch.testing.assert_close(model.features[0].weight, state["features.0.weight"])
    torch.testing.assert_close(model.classifier[3].weight, state["classifier.3.weight"])
    assert model.classifier[6].out_features == 2


def test_imagenet_weights_offline_without_a_cached_file(torch_home, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as e:
        build_model("imagenet")
    assert str(torch_home / WEIGHTS_FILE) in str(e.value) and "train.weights" in str(e.value)


def test_weights_from_a_local_state_dict(tmp_path):
    torch.manual_seed(2)
    state = models.vgg16(weights=None).state_dict()
    torch.save(state, tmp_path / "vgg16.pth")
    model = build_model(str(tmp_path / "vgg16.pth"))
    torch.testing.assert_close(model.features[28].weight, state["features.28.weight"])
    with pytest.raises(WeightsError, match="not a file"):
        build_model(str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        build_model(str(tmp_path / "wrong.pth"))
