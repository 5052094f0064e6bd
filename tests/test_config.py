"""Tests for otcbench.config (options, YAML, ``--set`` overrides) and otcbench.registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from otcbench.config import (
    EvalConfig,
    Options,
    SynthConfig,
    TrainJob,
    apply_overrides,
    dump_yaml,
    load_yaml,
    parse_override,
    validate,
)
from otcbench.errors import UserError
from otcbench.registry import Registry

# --------------------------------------------------------------------------------------------------
# --set overrides


@pytest.mark.parametrize(
    ("item", "path", "value"),
    [
        ("train.epochs=3", ["train", "epochs"], 3),
        ("train.lr=0.001", ["train", "lr"], 0.001),
        ("train.lr=1.0e-3", ["train", "lr"], 0.001),
        ("eval.zeroshot=true", ["eval", "zeroshot"], True),
        ("eval.zeroshot=false", ["eval", "zeroshot"], False),
        ("eval.probe_c_grid=[1, 2.5]", ["eval", "probe_c_grid"], [1, 2.5]),
        ("eval.probe_c_grid=[1,2]", ["eval", "probe_c_grid"], [1, 2]),
        ("model.name=otc-vit-tiny", ["model", "name"], "otc-vit-tiny"),
        ("model.init=null", ["model", "init"], None),
        ("model.name=", ["model", "name"], ""),
        ("a.b=x=y", ["a", "b"], "x=y"),
        ("a.b=some words here", ["a", "b"], "some words here"),
        ("a.b=[1, 2", ["a", "b"], "[1, 2"),  # not valid YAML: kept as text
        (" train.epochs = 5", ["train", "epochs"], 5),
        ("top=1", ["top"], 1),
        ("defense.options.k={a: 1}", ["defense", "options", "k"], {"a": 1}),
    ],
)
def test_parse_override(item: str, path: list[str], value: object) -> None:
    assert parse_override(item) == (path, value)


def test_parse_override_scientific_notation() -> None:
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 0.001)


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..epochs=3", ".epochs=3", "train.=3", ""])
def test_parse_override_rejects_malformed(item: str) -> None:
    with pytest.raises(UserError, match=r"expected KEY=VALUE.*--set train\.epochs=5") as info:
        parse_override(item)
    assert "\n" not in str(info.value)


def test_apply_overrides_nested_and_typed() -> None:
    base = {"train": {"epochs": 8, "lr": 0.1}, "model": {"name": "otc-rn-nano"}}
    out = apply_overrides(
        base,
        ["train.epochs=3", "train.lr=0.001", "eval.zeroshot=true", "eval.probe_c_grid=[1,2]",
         "model.name=otc-vit-tiny", "train.epochs=4"],
    )
    assert out == {
        "train": {"epochs": 4, "lr": 0.001},  # the last override wins
        "model": {"name": "otc-vit-tiny"},
        "eval": {"zeroshot": True, "probe_c_grid": [1, 2]},
    }
    assert base == {"train": {"epochs": 8, "lr": 0.1}, "model": {"name": "otc-rn-nano"}}  # not mutated


def test_apply_overrides_creates_sections() -> None:
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    assert apply_overrides({"a": None}, ["a.b=x"]) == {"a": {"b": "x"}}
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=2"]) == {"a": {"b": 1, "c": {"d": 2}}}
    assert apply_overrides({"a": 1}, None) == {"a": 1}
    assert apply_overrides({"a": 1}, []) == {"a": 1}


def test_apply_overrides_key_under_scalar() -> None:
    with pytest.raises(UserError, match=r"train\.epochs is a value, not a section; use --set train\.epochs="):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])
    with pytest.raises(UserError, match=r"'model\.name\.x\.y=1'.*model\.name is a value"):
        apply_overrides({"model": {"name": "m"}}, ["model.name.x.y=1"])


def test_overrides_then_validate() -> None:
    job = validate(TrainJob, apply_overrides({}, ["train.epochs=3", "train.lr=0.01", "model.name=x",
                                                  "defense.name=otcclip", "defense.options.eps=0.5"]))
    assert job.train.epochs == 3 and job.train.lr == 0.01 and job.model.name == "x"
    assert job.defense.name == "otcclip" and job.defense.options == {"eps": 0.5}
    assert job.train.batch_size == 128  # defaults kept
    # a typed float field gets a float from scientific notation
    assert validate(TrainJob, apply_overrides({}, ["train.lr=1e-3"])).train.lr == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------------
# validate: one-line errors naming the dotted key


def _one_line_error(model: type, data: dict, **kw) -> str:
    with pytest.raises(UserError) as info:
        validate(model, data, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_validate_unknown_key() -> None:
    msg = _one_line_error(TrainJob, {"train": {"epoch": 3}})
    assert "train.epoch: unknown key" in msg
    assert "--help" in msg
    msg = _one_line_error(TrainJob, {"trian": {"epochs": 3}})
    assert "trian: unknown key" in msg


def test_validate_wrong_type() -> None:
    msg = _one_line_error(TrainJob, {"train": {"epochs": "many"}})
    assert "train.epochs" in msg and "'many'" in msg and "integer" in msg
    msg = _one_line_error(TrainJob, {"train": {"epochs": 0}})
    assert "train.epochs" in msg and "greater than or equal to 1" in msg
    msg = _one_line_error(TrainJob, {"train": {"amp": "fp8"}})
    assert "train.amp" in msg
    msg = _one_line_error(TrainJob, {"train": {"epochs": "1\n2"}})  # input with a newline: still one line
    assert "train.epochs" in msg
    msg = _one_line_error(EvalConfig, {"probe_c_grid": [1.0, "x"]})
    assert "probe_c_grid.1" in msg


def test_validate_section_given_a_scalar() -> None:
    msg = _one_line_error(TrainJob, {"train": 5})
    assert msg.startswith("invalid options: train:")


def test_validate_where_and_many_errors() -> None:
    msg = _one_line_error(SynthConfig, {"image_size": 8}, where="data synth")
    assert msg.startswith("data synth: invalid options: image_size:")
    msg = _one_line_error(TrainJob, {"train": {"epochs": "a", "lr": "b", "seed": "c", "beta1": "d", "x": 1}})
    assert "(+2 more)" in msg


def test_validate_ok_and_roundtrip(tmp_path: Path) -> None:
    job = validate(TrainJob, {"data": "d", "train": {"epochs": "3"}})  # lax: "3" -> 3
    assert job.train.epochs == 3
    f = tmp_path / "config.yaml"
    f.write_text(dump_yaml(job))
    assert validate(TrainJob, load_yaml(f)) == job


def test_assignment_is_validated() -> None:
    job = validate(TrainJob, {})
    with pytest.raises(ValidationError):
        job.train.epochs = "x"  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------------
# load_yaml


def test_load_yaml_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist; check the path"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path)  # a directory is not a config file


def test_load_yaml_invalid(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: [1, 2\n  lr: 3\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+; fix the syntax") as info:
        load_yaml(f)
    assert "\n" not in str(info.value) and str(f) in str(info.value)


@pytest.mark.parametrize(
    ("text", "kind"), [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("3\n", "int")]
)
def test_load_yaml_non_mapping(tmp_path: Path, text: str, kind: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=rf"expected a mapping of options at the top level, got {kind}"):
        load_yaml(f)


def test_load_yaml_ok(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("")
    assert load_yaml(f) == {}
    f.write_text("train:\n  epochs: 2\n  lr: 0.5\n")
    assert load_yaml(str(f)) == {"train": {"epochs": 2, "lr": 0.5}}


# --------------------------------------------------------------------------------------------------
# Registry


@pytest.fixture
def registry() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        class Options(Options):
            size: int = Field(1, ge=1)
            mode: str = "fast"

    @reg.register("beta")
    class Beta:
        class Options(Options):
            pass

    return reg


def test_registry_register_and_get(registry: Registry) -> None:
    assert registry.names() == ["alpha", "beta"]
    alpha = registry.get("alpha")
    assert alpha.__name__ == "Alpha" and alpha.name == "alpha"
    assert registry.get("beta").name == "beta"


def test_registry_twice(registry: Registry) -> None:
    with pytest.raises(ValueError, match="registered twice"):

        @registry.register("alpha")
        class Other:
            pass

    assert registry.get("alpha").__name__ == "Alpha"


def test_registry_unknown_name(registry: Registry) -> None:
    with pytest.raises(UserError) as info:
        registry.get("alhpa")
    msg = str(info.value)
    assert "unknown widget 'alhpa'" in msg and "did you mean 'alpha'?" in msg
    assert "known: alpha, beta" in msg and "`otcbench list widgets`" in msg and "\n" not in msg
    with pytest.raises(UserError) as info:
        registry.get("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_registry_options(registry: Registry) -> None:
    opts = registry.options("alpha", {"size": "3"})
    assert opts.size == 3 and opts.mode == "fast"
    assert registry.options("alpha").size == 1
    assert registry.options("alpha", None).size == 1
    assert registry.options("beta", {}) is not None
    with pytest.raises(UserError, match=r"^widget alpha: invalid options: colour: unknown key"):
        registry.options("alpha", {"colour": "red"})
    with pytest.raises(UserError, match=r"widget alpha: invalid options: size: .*greater than or equal to 1"):
        registry.options("alpha", {"size": 0})
    with pytest.raises(UserError, match="unknown widget 'gamma'"):
        registry.options("gamma", {})


def test_registries_are_independent(registry: Registry) -> None:
    other: Registry = Registry("gadget")
    assert other.names() == []
    with pytest.raises(UserError, match="unknown gadget 'alpha'"):
        other.get("alpha")
