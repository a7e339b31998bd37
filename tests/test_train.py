"""train: frozen layers stay frozen, an interrupted run (also one killed in fine_tune's second phase) resumes to
the very same weights, torch.compile trains what eager does, the best epoch is kept, and weights that do not load
end the stage with what to do. The feature cache train reads is tested in tests/test_features.py."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from pipeline.model import build_model, set_train_mode
from tests.conftest import ROOT, features, features_cmd, run_train, train_cmd, weights, write_params


def test_an_epoch_on_images_draws_epoch_images_of_them_anew_each_epoch(prepared):
    from pipeline.params.train import load_member
    from pipeline.training import make_loaders

    p = dataclasses.replace(load_member(None, ROOT / "params.yaml"), epoch_images=20, batch_size=8, workers=0)
    pre = {"image_size": 32, "resize_size": 36, "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    loader, valid = make_loaders(prepared, None, p, pre, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert len(loader.dataset) == 72 and len(valid.dataset) == 8
    first, second = (list(loader.sampler) for _ in range(2))
    assert len(first) == len(set(first)) == 20 and first != second and len(loader) == 2  # drop_last: 16 of 20
    whole, _ = make_loaders(prepared, None, dataclasses.replace(p, epoch_images=0), pre, torch.device("cpu"),
                            torch.Generator().manual_seed(0))  # fmt: skip
    assert sorted(whole.sampler) == list(range(72))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_precision_resolves_per_device_and_trains(prepared, tmp_path, precision):
    """bf16 autocast where asked (auto: on CUDA and CPUs with AVX512_BF16 or AMX); training runs either way, also
    where bf16 is emulated (AVX2 CPUs), and the saved weights are float32."""
    from pipeline.model import native_bf16, use_bf16

    cpu = torch.device("cpu")
    expected = {"fp32": False, "bf16": True, "auto": native_bf16()}[precision]
    assert use_bf16(precision, cpu) is expected and use_bf16("auto", torch.device("cuda")) is True
    params = write_params(tmp_path / "params.yaml", finetune="all", epochs=1, precision=precision, feature_cache=False)
    log = run_train(tmp_path / "run", prepared, params)
    assert ("bf16 autocast" in log) is expected
    saved = weights(tmp_path / "run" / "model.pt").values()
    assert all(t.dtype == torch.float32 for t in saved if t.is_floating_point())


def test_frozen_layers_stay_in_eval_mode():
    model = build_model("vgg16", "none")
    set_train_mode(model, "head")
    assert not model.features.training and not model.classifier[2].training  # dropout off: fixed features
    assert model.classifier[6].training
    set_train_mode(model, "dense")
    assert not model.features.training and model.classifier[2].training
    set_train_mode(model, "all")
    assert model.features.training
    lite = build_model("efficientnet_lite0", "none")
    set_train_mode(lite, "head")
    assert not lite.bn2.training and lite.classifier.training  # BatchNorm statistics fixed under a frozen body
    set_train_mode(lite, "all", freeze_bn=True)  # the body trains, its BN statistics do not
    assert lite.conv_head.training and lite.classifier.training and not lite.bn2.training


@pytest.mark.slow
def test_killed_run_resumes_and_ends_with_the_same_weights(prepared, tmp_path):
    params = write_params(tmp_path / "params.yaml", finetune="dense", augment=True)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_train(whole, prepared, params)

    # kill -9 right after the first checkpoint lands
    features(broken, prepared, params)
    proc = subprocess.Popen(train_cmd(broken, prepared, params), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (broken / "ckpt.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_epochs = torch.load(broken / "ckpt.pt", weights_only=False)["epoch"]
    saved = torch.load(broken / "ckpt.pt", weights_only=False)["model"]
    assert saved and all(k.startswith("classifier.") for k in saved)  # only what trains (dense): no conv layers
    assert 1 <= done_epochs < 3, "the run finished before it could be interrupted"
    assert not (broken / "model.pt").exists()

    log = run_train(broken, prepared, params)
    assert re.search(rf"resuming from .*ckpt.pt after epoch {done_epochs} of 3", log), log
    assert f"epoch {done_epochs}/3" not in log and "epoch 3/3" in log  # continued, did not start over
    assert not (broken / "ckpt.pt").exists()
    # same weights, same bytes: evaluate, export and package see no change
    assert (whole / "model.pt").read_bytes() == (broken / "model.pt").read_bytes()
    # the learning curve lists every epoch once
    history = torch.load(broken / "model.pt", weights_only=False)["history"]
    assert len(history) == 3
    tsv = (broken / "live" / "plots" / "metrics" / "valid_accuracy.tsv").read_text().splitlines()
    assert len(tsv) == 4  # header + 3 epochs


@pytest.mark.slow
def test_checkpoint_of_other_params_is_not_resumed(prepared, tmp_path):
    work = tmp_path / "w"
    run_train(work, prepared, write_params(tmp_path / "a.yaml", epochs=1))
    # leave a checkpoint behind, as an interrupted run of other params would
    torch.save({"run_key": "someone-else", "epoch": 1}, work / "ckpt.pt")
    log = run_train(work, prepared, write_params(tmp_path / "b.yaml", epochs=1, seed=3))
    assert "belongs to other params or data" in log and "resuming" not in log
    assert "removed the previous" in log  # as dvc repro does: a model beside a checkpoint marks it abandoned


def test_model_file_rebuilds_alone(prepared, tmp_path):
    from pipeline.model import load_model

    run_train(tmp_path, prepared, write_params(tmp_path / "p.yaml", epochs=1))
    model, meta = load_model(tmp_path / "model.pt")
    assert meta["classes"] == ("cats", "dogs") and meta["image_size"] == 32 and meta["resize_size"] == 36
    assert meta["params"]["finetune"] == "head" and len(meta["history"]) == 1
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


@pytest.mark.slow
def test_compiled_training_equals_eager(prepared, tmp_path):
    """train.compile (torch.compile, inductor) runs here on CPU and trains the same weights as eager."""
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    log = run_train(compiled, prepared, write_params(tmp_path / "a.yaml", epochs=2, compile=True))
    assert "torch.compile: on (OptimizedModule)" in log
    assert "torch.compile" not in run_train(eager, prepared, write_params(tmp_path / "b.yaml", epochs=2, compile=False))
    a, b = weights(compiled / "model.pt"), weights(eager / "model.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("stage", ["features", "train"])
def test_unloadable_weights_end_the_stages_with_the_message(prepared, tmp_path, stage):
    """A bad train.weights (or ImageNet weights offline) ends features/train with what to do, not a traceback."""
    missing = tmp_path / "nowhere" / "vgg16.pth"
    # features builds the model only for a cache; without one, train is the first to build it
    params = write_params(tmp_path / "p.yaml", weights=str(missing), feature_cache=stage == "features")
    if stage == "train":
        features(tmp_path, prepared, params)  # the cache does not apply: it needs no weights
    cmd = (features_cmd if stage == "features" else train_cmd)(tmp_path, prepared, params)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert f"train.weights is '{missing}', which is not a file" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("stage", ["features", "train"])
@pytest.mark.parametrize(
    "train, words",
    [
        (dict(arch="efficientnet_lite0", finetune="dense"), "efficientnet_lite0 has no dense block"),
        (dict(finetune="all", frozen_groups=1), "would freeze all of vgg16's body"),
    ],
)
def test_an_impossible_finetune_ends_the_stages_with_the_message(prepared, tmp_path, stage, train, words):
    """`finetune: dense` on an arch without a dense block trained the head alone, silently; freezing every layer
    group of the body leaves nothing of it to train."""
    params = write_params(tmp_path / "p.yaml", weights="none", feature_cache=stage == "features", **train)
    if stage == "train":
        features(tmp_path, prepared, params)  # the cache does not apply: it builds no model
    cmd = (features_cmd if stage == "features" else train_cmd)(tmp_path, prepared, params)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if stage == "features" and train["finetune"] == "all":  # fine_tune without head epochs caches nothing
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 1, done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr


FINE_TUNE = dict(arch="efficientnet_lite0", finetune="all", head_epochs=1, epochs=2, augment=True, lr=0.003)


@pytest.mark.slow
def test_fine_tune_killed_in_its_second_phase_resumes_to_the_same_bytes(prepared, tmp_path):
    """fastai's fine_tune (head on cached activations, then everything on augmented images), killed after the
    first epoch of the unfrozen phase, ends with the same model.pt, byte for byte, as an uninterrupted run."""
    params = write_params(tmp_path / "params.yaml", **FINE_TUNE)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    log = run_train(whole, prepared, params)
    assert "head for 1 epochs at lr 0.002 then all for 2 epochs at lr 0.003" in log
    assert re.search(r"head: 2,562 trainable parameters on cached activations|head: 2562 trainable", log), log
    assert json.loads((whole / "features" / "meta.json").read_text())["finetune"] == "head"

    features(broken, prepared, params)
    proc = subprocess.Popen(train_cmd(broken, prepared, params), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline, epoch = time.monotonic() + 300, 0
    while epoch < 2 and proc.poll() is None and time.monotonic() < deadline:
        if (broken / "ckpt.pt").exists():
            epoch = torch.load(broken / "ckpt.pt", weights_only=False)["epoch"]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(broken / "ckpt.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["finetune"]) == (2, "all"), "the run was not interrupted in its second phase"
    assert any(k.startswith("blocks.") for k in ckpt["model"])  # the body trains in this phase

    log = run_train(broken, prepared, params)
    assert "resuming from" in log and "after epoch 2 of 3" in log and "epoch 3/3" in log and "epoch 2/3" not in log
    assert (whole / "model.pt").read_bytes() == (broken / "model.pt").read_bytes()


@pytest.mark.slow
def test_the_epoch_with_the_lowest_validation_log_loss_is_kept(prepared, tmp_path):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from pipeline.model import eval_transform, load_model, predict_logits

    run_train(tmp_path, prepared, write_params(tmp_path / "p.yaml", epochs=6, lr=0.5, keep="best"))
    model, meta = load_model(tmp_path / "model.pt")
    losses = [m["valid_log_loss"] for m in meta["history"]]
    assert meta["best_epoch"] == 1 + losses.index(min(losses))
    assert meta["best_epoch"] != len(losses), "the last epoch was the best: this test would not see the difference"
    loader = DataLoader(ImageFolder(prepared / "valid", transform=eval_transform(meta)), batch_size=16)
    logits, y = predict_logits(model, loader, torch.device("cpu"))
    p_dog = torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy()
    from sklearn.metrics import log_loss

    assert log_loss(y, p_dog, labels=[0, 1]) == pytest.approx(min(losses), abs=1e-5)


@pytest.mark.slow
def test_refit_trains_on_train_and_valid_up_to_the_kept_epoch_and_keeps_the_validated_weights(prepared, tmp_path):
    """train.refit: the same run, then the same plan again on train + valid, stopped at the kept epoch. model.pt's
    `model` is the refit (exported, submitted, served); `validated_model` is, tensor for tensor, what the run without
    refit keeps, and is what evaluate scores (load_model(validated=True))."""
    from pipeline.model import load_model

    plain, refit = tmp_path / "plain", tmp_path / "refit"
    recipe = {**FINE_TUNE, "keep": "last"}  # the refit then runs both phases: the head on cache, then all on images
    run_train(plain, prepared, write_params(tmp_path / "a.yaml", **recipe))
    log = run_train(refit, prepared, write_params(tmp_path / "b.yaml", **recipe, refit=True))
    a, b = (torch.load(w / "model.pt", weights_only=False) for w in (plain, refit))
    assert not a["refit"] and "validated_model" not in a and b["refit"]
    assert a["model"].keys() == b["validated_model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["validated_model"][k]) for k in a["model"])
    assert any(not torch.equal(b["model"][k], b["validated_model"][k]) for k in b["model"])
    images = sum(1 for split in ("train", "valid") for f in (prepared / split).rglob("*.jpg"))
    epochs = re.findall(r"refit epoch (\d+)/(\d+) on (\d+) images", log)
    assert b["best_epoch"] == 3 and "refit epoch 3/3 on" in log and "images (all)" in log  # both phases ran
    assert [int(e) for e, _, _ in epochs] == list(range(1, b["best_epoch"] + 1)), log
    assert {int(n) for _, _, n in epochs} == {images} and {int(s) for _, s, _ in epochs} == {b["best_epoch"]}
    validated, meta = load_model(refit / "model.pt", validated=True)
    served, _ = load_model(refit / "model.pt")
    assert meta["refit"] and "validated_model" not in meta
    assert all(torch.equal(v, a["model"][k]) for k, v in validated.state_dict().items())
    assert all(torch.equal(v, b["model"][k]) for k, v in served.state_dict().items())
