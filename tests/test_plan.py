"""The plan printed before a run: image counts from the zip, each member's stages and epochs, an estimate."""

import re
import subprocess

import yaml

from tests.conftest import BIN, ROOT, tiny_demo, tool_env


def test_the_plan_counts_the_zips_images_and_lists_each_members_phases(demo_zip, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    overrides = [
        f"fetch.source={demo_zip}", "prepare.valid_per_class=4", "train.arch=resnet18", "train.image_size=32",
        "train.finetune=all", "train.head_epochs=2", "train.epochs=3", "train.augment=true", "train.batch_size=4",
        "predict.tta=true", "~members", "+members={a:{},b:{epochs:1,lr:0.0003}}",
    ]  # fmt: skip
    cmd = [str(BIN / "python"), "-m", "pipeline.tools.plan", "--params", str(params)]
    cmd += [arg for o in overrides for arg in ("-S", o)]
    done = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    n = tiny_demo()
    assert f"the plan: {2 * n.train_per_class - 8} train, 8 valid, {n.test_count} test images; 2 member(s)" in out
    assert "member a: resnet18 at 32 px on cpu" in out and "member b: resnet18 at 32 px on cpu" in out
    assert "head: 2 epochs at lr 0.002 on cached activations" in out
    assert "all: 3 epochs at lr 0.01 on 32 images" in out and "all: 1 epochs at lr 0.0003 on 32 images" in out
    assert "8 validation images + mirrors" in out and "blend" in out
    assert re.search(r"estimated total: \d+ min", out)
    assert params.read_text() == before  # the overrides went into a copy

    typo = subprocess.run(cmd + ["-S", "train.epocs=3"], cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert typo.returncode != 0 and "epocs" in typo.stderr and yaml.safe_load(params.read_text())
