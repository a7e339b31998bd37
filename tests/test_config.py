import pytest
import yaml

from pipeline.config import ConfigError, from_dict, load_params
from pipeline.params.fetch import FetchParams
from pipeline.params.prepare import PrepareParams
from pipeline.params.train import TrainParams, load_member, member_names
from tests.conftest import ROOT


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
    from pipeline.setparams import set_params

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
