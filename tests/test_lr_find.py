"""lr_find: the range test sweeps on the cached activations, writes the plot, and suggests a learning rate."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.stages.lr_find import valley
from tests.conftest import ROOT, features, write_params


def test_valley_is_half_way_down_the_longest_fall():
    lrs = np.logspace(-6, 1, 50)
    losses = np.r_[np.full(10, 0.7), np.linspace(0.7, 0.1, 30), np.linspace(0.1, 3.0, 10)]  # flat, fall, blow-up
    lr = valley(list(zip(lrs, losses, strict=True)))
    assert lrs[15] <= lr <= lrs[30]  # inside the fall, away from both ends


def test_sweep_on_cached_activations_writes_the_curve_and_a_suggestion(prepared, tmp_path):  # noqa: F811
    params = write_params(tmp_path / "p.yaml")
    features(tmp_path, prepared, params)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.stages.lr_find",
        "--data",
        str(prepared),
        "--features",
        str(tmp_path / "features"),
    ]
    cmd += ["--out", str(tmp_path / "plots"), "--metrics", str(tmp_path / "lr_find.json"), "--params", str(params)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(tmp_path / "plots" / "lr_find.csv")))
    lrs = [float(r["lr"]) for r in rows]
    assert len(rows) >= 10 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-7, rel=1e-3)
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["on"] == "cached activations" and result["finetune"] == "head" and result["key"] == "train.lr"
    assert lrs[0] < result["suggested_lr"] < lrs[-1]
    assert "the valley suggests train.lr=" in done.stderr
