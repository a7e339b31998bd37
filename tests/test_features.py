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


def test_fine_tunes_head_epochs_cache_a_fixed_draw_of_epoch_images_photos(prepared, tmp_path):
    """finetune all with head epochs and train.epoch_images: the cache holds that many training photos, the rows of
    the whole cache at a seeded draw, the same draw every time; validation whole; train reads it and trains."""
    import numpy as np

    common = dict(finetune="all", head_epochs=1, epochs=1, augment=True, arch="resnet18")
    whole, drawn = tmp_path / "whole", tmp_path / "drawn"
    features(whole, prepared, write_params(tmp_path / "a.yaml", **common, epoch_images=0))
    run_train(drawn, prepared, write_params(tmp_path / "b.yaml", **common, epoch_images=20))
    meta = json.loads((drawn / "features" / "meta.json").read_text())
    assert meta["cached"] and meta["train"]["n"] == 20 and meta["valid"]["n"] == 8
    assert json.loads((whole / "features" / "meta.json").read_text())["train"]["n"] == 72
    rows, all_rows = np.load(drawn / "features" / "train.npy"), np.load(whole / "features" / "train.npy")
    labels, all_labels = (np.load(w / "features" / "train_labels.npy") for w in (drawn, whole))
    keep = [int(np.argmin(np.abs(all_rows - r).sum(1))) for r in rows]
    assert len(set(keep)) == 20 and keep == sorted(keep) and list(all_labels[keep]) == list(labels)
    np.testing.assert_allclose(rows, all_rows[keep], atol=1e-5)
    assert 0 < labels.mean() < 1  # both classes drawn
    again = tmp_path / "again"
    features(again, prepared, write_params(tmp_path / "b.yaml", **common, epoch_images=20))
    assert np.array_equal(np.load(again / "features" / "train.npy"), rows)
    assert (
        json.loads((again / "features" / "meta.json").read_text())["key"]
        == meta["key"]
        != json.loads((whole / "features" / "meta.json").read_text())["key"]
    )
