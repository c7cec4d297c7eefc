"""RunConfig: keys, YAML-typed values, clear errors for unknown keys and wrong types, YAML files."""

from __future__ import annotations

import pytest

from sqdf.config import load_yaml, parse_assignment
from sqdf.errors import ConfigError, SqdfError
from sqdf.training.run_setup import default_config


@pytest.fixture
def cfg():
    return default_config("sqdf")


# ---- keys ------------------------------------------------------------------------------------------------------


def test_set_section_dot_field(cfg):
    cfg.set("method.gamma", "0.8")
    cfg.set("trainer.steps", "7")
    cfg.set("task.num_inference_steps", "20")
    assert cfg.method.gamma == 0.8
    assert cfg.trainer.steps == 7
    assert cfg.task.num_inference_steps == 20


def test_set_bare_field_unique_to_one_section(cfg):
    cfg.set("gamma", "0.5")
    cfg.set("eval_samples", "128")
    cfg.set("eta", "0.25")
    assert cfg.method.gamma == 0.5
    assert cfg.trainer.eval_samples == 128
    assert cfg.task.eta == 0.25


def test_bare_field_in_two_sections_is_ambiguous(cfg):
    # 'alpha' is both method.alpha and task.alpha
    with pytest.raises(ConfigError) as err:
        cfg.set("alpha", "2")
    msg = str(err.value)
    assert "ambiguous" in msg and "method.alpha" in msg and "task.alpha" in msg
    assert cfg.method.alpha is None and cfg.task.alpha is None


def test_set_only_touches_its_own_key(cfg):
    before = cfg.to_dict()
    cfg.set("method.batch_size", "16")
    after = cfg.to_dict()
    before["method"]["batch_size"] = 16
    assert after == before


# ---- YAML-typed values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,text,expected",
    [
        ("trainer.steps", "12", 12),
        ("trainer.seed", "-3", -3),
        ("method.gamma", "0.95", 0.95),
        ("method.gamma", "1", 1.0),  # an int literal for a float field becomes a float
        ("method.lr", "1.0e-3", 1e-3),
        ("trainer.tensorboard", "false", False),
        ("trainer.tensorboard", "true", True),
        ("trainer.plots", "no", False),  # YAML 1.1 booleans
        ("method.alpha", "None", None),
        ("method.alpha", "null", None),
        ("method.alpha", "~", None),
        ("method.alpha", "0.5", 0.5),
        ("method.train_batch_size", "none", None),
        ("method.train_batch_size", "8", 8),
        ("task.base_path", "null", None),
        ("task.base_path", "some/file.safetensors", "some/file.safetensors"),
        ("trainer.mixed_precision", "no", "no"),  # a str field keeps 'no' as text, not YAML False
        ("trainer.device", "cpu", "cpu"),
    ],
)
def test_values_are_parsed_as_yaml_and_coerced(cfg, key, text, expected):
    cfg.set(key, text)
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected
    assert type(value) is type(expected)


def test_exponent_without_dot_is_a_float(cfg):
    cfg.set("method.lr", "1e-3")
    assert cfg.method.lr == 1e-3


def test_yaml_file_exponent_without_dot_is_a_float(cfg, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  lr: 1e-4\n")
    cfg.update(load_yaml(str(path)))
    assert cfg.method.lr == 1e-4


def test_update_takes_typed_values_nested_and_flat(cfg):
    cfg.update({"method": {"gamma": 0.7, "batch_size": 8}, "trainer": {"tensorboard": False}, "task.eta": 0.5})
    assert cfg.method.gamma == 0.7 and cfg.method.batch_size == 8
    assert cfg.trainer.tensorboard is False
    assert cfg.task.eta == 0.5
    # raw=False: a string from a YAML file stays a string (and is therefore not a valid int)
    with pytest.raises(ConfigError, match="trainer.steps"):
        cfg.update({"trainer": {"steps": "12"}})


def test_parse_assignment():
    assert parse_assignment("method.gamma=0.9") == ("method.gamma", "0.9")
    assert parse_assignment(" a = b=c") == ("a", " b=c")  # only the first '=' splits
    with pytest.raises(ConfigError, match=r"key=value"):
        parse_assignment("method.gamma")


# ---- unknown keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,suggestion",
    [("method.gamm", "method.gamma"), ("trainer.step", "trainer.steps"), ("gama", "gamma"),
     ("task.num_inference_step", "task.num_inference_steps"), ("methd.gamma", "method.gamma")],
)
def test_unknown_key_suggests_the_nearest(cfg, key, suggestion):
    with pytest.raises(ConfigError) as err:
        cfg.set(key, "1")
    msg = str(err.value)
    assert f"unknown config key {key!r}" in msg
    assert "did you mean" in msg
    # the nearest key is the first suggestion
    assert msg.split("did you mean ", 1)[1].startswith(suggestion)


def test_unknown_key_far_from_everything_points_to_help_config(cfg):
    with pytest.raises(ConfigError) as err:
        cfg.set("zzzzqqqq", "1")
    assert "--help-config" in str(err.value)


def test_config_errors_are_sqdf_errors():
    # the CLI turns SqdfError into a one-line message and exit code 2
    assert issubclass(ConfigError, SqdfError)


# ---- wrong types -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,text",
    [
        ("trainer.steps", "abc"),
        ("trainer.steps", "2.5"),
        ("trainer.steps", "true"),  # a bool is not an int
        ("method.gamma", "high"),
        ("method.gamma", "[1, 2]"),
        ("method.gamma", "None"),  # gamma is not optional
        ("trainer.tensorboard", "maybe"),
        ("trainer.tensorboard", "1"),
        ("method.batch_size", ""),
    ],
)
def test_wrong_type_names_the_key(cfg, key, text):
    before = cfg.to_dict()
    with pytest.raises(ConfigError) as err:
        cfg.set(key, text)
    assert key in str(err.value)
    assert cfg.to_dict() == before  # nothing changed


def test_wrong_type_from_yaml_names_the_key(cfg):
    with pytest.raises(ConfigError, match=r"method\.batch_size"):
        cfg.update({"method": {"batch_size": 1.5}})


def test_unknown_key_in_yaml_section_suggests(cfg):
    with pytest.raises(ConfigError, match=r"method\.gamm'.*did you mean method\.gamma"):
        cfg.update({"method": {"gamm": 0.9}})


# ---- YAML files ------------------------------------------------------------------------------------------------


def test_load_yaml_reads_a_mapping(tmp_path, cfg):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  steps: 9\n  tensorboard: false\nmethod:\n  gamma: 0.75\n  alpha: null\n")
    data = load_yaml(str(path))
    assert data == {"trainer": {"steps": 9, "tensorboard": False}, "method": {"gamma": 0.75, "alpha": None}}
    cfg.update(data)
    assert cfg.trainer.steps == 9 and cfg.method.gamma == 0.75 and cfg.trainer.tensorboard is False


def test_load_yaml_empty_file_is_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(str(path)) == {}


def test_load_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_yaml(str(path))
    assert str(path) in str(err.value) and "does not exist" in str(err.value)


def test_load_yaml_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: {gamma: [0.9\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(str(path))
    assert str(path) in str(err.value) and "not valid YAML" in str(err.value)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "3\n"])
def test_load_yaml_non_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(str(path))
    assert str(path) in str(err.value) and "mapping" in str(err.value)
