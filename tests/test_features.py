"""features: training on the cached activations ends with the same weights and history as training on the images
(for `head` and `dense`), and train refuses a cache made for other params, saying what to run. The stages run for
real on a tiny prepared set (the `prepared` fixture and the helpers are in tests/conftest.py)."""

import json
import subprocess

import pytest
import torch

from tests.conftest import ROOT, features, run_train, train_cmd, weights, write_params


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["head", "dense"])
def test_training_on_cached_activations_equals_training_on_images(prepared, tmp_path, finetune):
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    run_train(cached, prepared, write_params(tmp_path / "a.yaml", finetune=finetune, epochs=2, feature_cache=True))
    run_train(uncached, prepared, write_params(tmp_path / "b.yaml", finetune=finetune, epochs=2, feature_cache=False))
    meta = json.loads((cached / "features" / "meta.json").read_text())
    assert meta["cached"] and meta["train"]["dim"] == (4096 if finetune == "head" else 25088)
    assert not json.loads((uncached / "features" / "meta.json").read_text())["cached"]
    a, b = weights(cached / "model.pt"), weights(uncached / "model.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
    ha = torch.load(cached / "model.pt", weights_only=False)["history"]
    hb = torch.load(uncached / "model.pt", weights_only=False)["history"]
    for ma, mb in zip(ha, hb, strict=True):
        assert ma == pytest.approx(mb, rel=1e-4, abs=1e-5)


def test_cache_is_refused_when_it_does_not_match(prepared, tmp_path):
    features(tmp_path, prepared, write_params(tmp_path / "a.yaml", seed=1))
    done = subprocess.run(
        train_cmd(tmp_path, prepared, write_params(tmp_path / "b.yaml", seed=2)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0 and "run 'dvc repro features'" in done.stderr
