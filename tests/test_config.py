import pytest
import yaml

from pipeline.config import ConfigError, from_dict, load_params
from pipeline.params.fetch import FetchParams
from pipeline.params.prepare import PrepareParams
from pipeline.params.train import TrainParams, load_member, member_names
from tests.conftest import ROOT, changed_params


def test_project_params_load():
    fetch = load_params(FetchParams, "fetch", ROOT / "params.yaml")
    prepare = load_params(PrepareParams, "prepare", ROOT / "params.yaml")
    assert fetch.competition == "dogs-vs-cats-redux-kernels-edition"
    assert prepare.sample_train_per_class == 8 and prepare.sample_valid_per_class == 4


def prepare_dict(**changes):
    d = dict(seed=1, valid_per_class=5, valid_fraction=0.0, sample_train_per_class=3, sample_valid_per_class=2,
             max_pixels=100, workers=0)  # fmt: skip
    d.update(changes)
    return d


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"prepare: unknown key\(s\) valid_per_clas\b"):
        from_dict(PrepareParams, {**prepare_dict(), "valid_per_clas": 3}, "prepare")


def test_missing_key_is_an_error_naming_it():
    d = prepare_dict()
    del d["seed"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) seed"):
        from_dict(PrepareParams, d, "prepare")


@pytest.mark.parametrize("value", ["10", 1.5, True, None])
def test_wrong_type_is_an_error_naming_the_key(value):
    with pytest.raises(ConfigError, match="prepare.valid_per_class: expected int"):
        from_dict(PrepareParams, prepare_dict(valid_per_class=value), "prepare")


def test_nested_section_errors_name_the_full_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(
        "fetch:\n  source: demo\n  competition: c\n  demo:\n    seed: 1\n    train_per_class: 2\n"
        "    test_count: 2\n    min_side: 8\n    max_side: 9\n    mislabel_fraction: high\n    hard_fraction: 0\n"
    )
    with pytest.raises(ConfigError, match="fetch.demo.mislabel_fraction: expected float"):
        load_params(FetchParams, "fetch", p)


def test_int_is_accepted_for_float():
    d = dict(seed=1, train_per_class=2, test_count=2, min_side=8, max_side=9, mislabel_fraction=0, hard_fraction=1)
    params = from_dict(FetchParams, {"source": "demo", "competition": "c", "demo": d}, "fetch")
    assert params.demo.hard_fraction == 1.0 and isinstance(params.demo.hard_fraction, float)


def test_missing_section(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("fetch: {}\n")
    with pytest.raises(ConfigError, match="section 'prepare' is missing"):
        load_params(PrepareParams, "prepare", p)


def test_set_params_keeps_comments_and_refuses_unknown_keys_and_wrong_types(tmp_path):
    from pipeline.tools.setparams import set_params

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    assert set_params(path, ["fetch.source=kaggle", "train.lr=0.001", "train.epochs=40"]) == [
        "fetch.source",
        "train.lr",
    ]  # epochs was 40 already
    text = path.read_text()
    assert "source: kaggle" in text and "lr: 0.001" in text and "# One section per stage" in text
    assert set_params(path, ["fetch.source=demo", "train.lr=0.01"]) == ["fetch.source", "train.lr"]
    assert path.read_text() == (ROOT / "params.yaml").read_text()  # back to the same bytes
    with pytest.raises(SystemExit, match="has no key train.nope"):
        set_params(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        set_params(path, ["train.epochs=many"])


def test_a_member_is_the_train_section_with_its_overrides(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["members"] = {"lite0": {"arch": "efficientnet_lite0", "lr": 0.0005}, "plain": {}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert member_names(path) == ["lite0", "plain"]
    lite0 = load_member("lite0", path)
    assert (lite0.arch, lite0.lr, lite0.epochs) == ("efficientnet_lite0", 0.0005, params["train"]["epochs"])
    assert load_member("plain", path) == load_member(None, path) == load_params(TrainParams, "train", path)
    with pytest.raises(ConfigError, match=r"no member 'lite9' in members \(there are: lite0, plain\)"):
        load_member("lite9", path)


@pytest.mark.parametrize(
    "members, message",
    [
        ({"a": {"lrr": 0.1}}, r"members.a: unknown key\(s\) lrr: a member overrides train's keys"),
        ({"a": {"lr": "fast"}}, r"train \+ members.a.lr: expected float"),
        ({"A b": {}}, r"'A b' is not a usable name"),
        ({"onnx": {}}, r"'onnx' is not a usable name"),
        ({"a": ["lr"]}, r"members.a: expected a mapping"),
        ({}, r"'members' must map each model's name"),
    ],
)
def test_a_wrong_member_is_a_clear_error(tmp_path, members, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["members"] = members
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=message):
        for name in member_names(path):
            load_member(name, path)


# --- ranges: every field of every section has one; a params error ends a stage with one line ----------------


def load_every_section(path):
    """Load each section of params.yaml at `path` as the stages do."""
    from pipeline.params.train import LrFindParams
    from pipeline.tools.setparams import SECTIONS

    for section, cls in {**SECTIONS, "lr_find": LrFindParams}.items():
        load_params(cls, section, path)
    for name in member_names(path):
        load_member(name, path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.epochs", 0, "train.epochs must be >= 1, got 0"),
        ("train.batch_size", 0, "train.batch_size must be >= 1, got 0"),
        ("train.lr", 0, "train.lr must be > 0, got 0.0"),
        ("train.lr", -0.1, "train.lr must be > 0, got -0.1"),
        ("train.warmup", 1.0, r"train.warmup must be in \[0, 1\), got 1.0"),
        ("train.min_scale", 0, r"train.min_scale must be in \(0, 1\], got 0.0"),
        ("train.image_size", 16, "train.image_size must be 0 or >= 32, got 16"),
        ("train.workers", -1, "train.workers must be >= 0, got -1"),
        ("train.arch", "", "train.arch must be a non-empty string"),
        ("members.model", {"epochs": 0}, r"train \+ members.model.epochs must be >= 1, got 0"),
        ("fetch.demo.mislabel_fraction", 0.5, r"fetch.demo.mislabel_fraction must be in \[0, 0.5\), got 0.5"),
        ("fetch.demo.max_side", 50, "fetch.demo: max_side .50. must be >= min_side .96."),
        ("fetch.competition", "dogs vs cats", "fetch.competition must be a Kaggle competition's slug"),
        ("lr_find.end_lr", 1e-8, "lr_find: end_lr .1e-08. must be > start_lr"),
        ("features.batch_size", 0, "features.batch_size must be >= 1, got 0"),
        ("evaluate.clip_step", 0, "evaluate.clip_step must be > 0, got 0.0"),
        ("evaluate.clip_max", 0.5, r"evaluate.clip_max must be in \[0, 0.5\), got 0.5"),
        ("blend.folds", 1, "blend.folds must be 0 or >= 2, got 1"),
        ("export.opset", 9, r"export.opset must be in \[18, 23\], got 9"),
        ("export.variants", [], "export.variants must be a non-empty list without repeats"),
        ("export.max_accuracy_drop", 1.5, r"export.max_accuracy_drop must be in \[0, 1\], got 1.5"),
        ("predict.clip", 0.5, r"predict.clip must be in \[0, 0.5\), got 0.5"),
        ("predict.batch_size", 0, "predict.batch_size must be >= 1, got 0"),
        ("package.model_name", "Dogs/Cats", "package.model_name must be a BentoML model name"),
        ("package.member", "a/b", "package.member must be best or a member's name"),
        ("serve.max_batch_size", 0, "serve.max_batch_size must be >= 1, got 0"),
        ("serve.workers", 0, "serve.workers must be >= 1, got 0"),
        ("prepare.workers", -1, "prepare.workers must be >= 0, got -1"),
    ],
)
def test_a_value_out_of_its_range_is_an_error_naming_the_key_and_the_file(tmp_path, key, value, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(changed_params({key: value})))
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_every_section(path)


def makefile_recipes() -> dict[str, dict]:
    """The Makefile's overrides of params.yaml (make repro, make offline, make offline-ensemble, make demo) as
    {"section.key": value}, members included."""
    import re

    makefile = (ROOT / "Makefile").read_text()
    values = lambda name: re.search(rf"\n{name} = (.*?\n(?:\t.*\n)*)", makefile)[1].replace("\\", " ").split()  # noqa: E731
    recipes = {}
    for name in ("KAGGLE_PARAMS", "OFFLINE_PARAMS", "DEMO_PARAMS"):
        words = [w.strip("'") for w in values(name)]
        for alias, members in (("$(ONE_MEMBER)", "ONE_MEMBER"), ("$(OFFLINE_MEMBER)", "OFFLINE_MEMBER")):
            if alias in words:
                words = [w for w in words if w != alias] + [w.strip("'") for w in values(members)]
        recipe = {}
        for word in words:
            key, _, text = word.lstrip("+").partition("=")
            if key.startswith("~") or "$(" in text:
                continue  # '~members' removes the mapping the next word sets; $(ZIP_PATH) is the user's zip
            # dvc exp run -S's {a:{b:1}} is YAML flow style with no space after the colon
            recipe[key] = yaml.safe_load(re.sub(r":(?=\S)", ": ", text)) if key == "members" else yaml.safe_load(text)
        recipes[name] = recipe
    recipes["ENSEMBLE"] = {**recipes["OFFLINE_PARAMS"], "members": yaml.safe_load(
        re.sub(r":(?=\S)", ": ", values("ENSEMBLE")[1].strip("'").partition("=")[2]))}  # fmt: skip
    return recipes


def test_the_committed_params_the_makefiles_recipes_and_the_tests_params_pass_the_checks(tmp_path):
    from tests.conftest import TINY_DEMO

    recipes = makefile_recipes()
    assert recipes["OFFLINE_PARAMS"]["train.arch"] == "efficientnet_lite0" and len(recipes["ENSEMBLE"]["members"]) == 3
    served = {"train.image_size": 32, "train.epochs": 1, "train.batch_size": 8, "train.workers": 0,
              "serve.max_bytes": 300_000, "serve.max_pixels": 4_000_000, "serve.max_latency_ms": 20000}  # fmt: skip
    for changes in [{}, *recipes.values(), TINY_DEMO, served]:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(changed_params(changes)))
        load_every_section(path)


def stage_command(module: str, tmp) -> list[str]:
    """`python -m pipeline.<module>` with its required arguments, every path in `tmp` (none need exist: the
    params are read first)."""
    import sys

    paths = {
        "fetch": ["--zip", "z.zip", "--labels", "l.csv", "--downloads", "downloads"],
        "prepare": ["--zip", "z.zip", "--out", "prepared", "--metrics", "m.json"],
        "features": ["--data", "prepared", "--out", "features"],
        "train": ["--data", "prepared", "--features", "f", "--model", "m.pt", "--checkpoint", "c.pt", "--live", "l"],
        "lr_find": ["--data", "prepared", "--features", "f", "--out", "o", "--metrics", "m.json"],
        "evaluate": ["--data", "prepared", "--model", "m.pt", "--metrics", "m.json", "--plots", "p"],
        "export": ["--model", "m.pt", "--data", "prepared", "--out", "onnx", "--metrics", "m.json"],
        "blend": ["--predictions", "p", "--metrics", "b.json", "--plots", "p"],
        "predict": ["--onnx", "o", "--data", "d", "--blend", "b.json", "--submission", "s.csv", "--metrics", "m.json"],
        "package": ["--onnx", "o", "--metrics", "m", "--out", "o.json"],
    }[module]
    paths = [str(tmp / a) if not a.startswith("--") else a for a in paths]
    return [sys.executable, "-m", f"pipeline.stages.{module}", *paths, "--params", str(tmp / "params.yaml")]


@pytest.mark.parametrize(
    "module, changes, message",
    [
        ("train", {"train.epochs": 0}, "train.epochs must be >= 1, got 0"),
        ("train", {"train.batch_size": 0}, "train.batch_size must be >= 1, got 0"),
        ("train", {"train.epochz": 3}, r"train: unknown key\(s\) epochz"),
        ("train", {"train.lr": "fast"}, "train.lr: expected float, got str 'fast'"),
        ("train", {"members": {"a/b": {}}}, "members: 'a/b' is not a usable name"),
        ("features", {"features.workers": -2}, "features.workers must be >= 0, got -2"),
        ("lr_find", {"lr_find.steps": 0}, "lr_find.steps must be >= 1, got 0"),
        ("evaluate", {"evaluate.batch_size": 0}, "evaluate.batch_size must be >= 1, got 0"),
        ("export", {"export.tolerance": -1}, r"export.tolerance must be in \(0, 1\], got -1.0"),
        ("blend", {"blend.folds": -1}, "blend.folds must be 0 or >= 2, got -1"),
        ("predict", {"predict.batch_size": 0}, "predict.batch_size must be >= 1, got 0"),
        ("package", {"package.model_name": "a/b"}, "package.model_name must be a BentoML model name"),
        ("fetch", {"fetch.demo.train_per_class": 0}, "fetch.demo.train_per_class must be >= 1, got 0"),
        ("prepare", {"prepare.seed": -1}, "prepare.seed must be >= 0, got -1"),
    ],
)
def test_a_params_error_ends_the_stage_with_one_line_naming_the_key(tmp_path, module, changes, message):
    """The real stage module, as dvc repro runs it: exit status 1, one line on stderr, no traceback."""
    import re
    import subprocess

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed_params(changes)))
    cmd = stage_command(module, tmp_path)
    if module in ("train", "features", "lr_find") and "members" in changes:
        cmd += ["--member", "a/b"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(f"{re.escape(str(tmp_path / 'params.yaml'))}: {message}", lines[0]), lines


def test_a_params_file_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML \(line 3, column 1\): ") as e:
        load_member(None, path)
    assert "\n" not in str(e.value)
