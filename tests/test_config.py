"""Schemas derived from config dataclasses (`lwjax.config.schema_of`): one source of truth, the same one-line errors."""

import dataclasses

import pytest

from lwjax.config import ConfigError, DefaultedGroup, Field, option, schema_of, validate


@dataclasses.dataclass(frozen=True)
class Inner:
  rate: float = option(0.5, min=0.0, max=1.0)


@dataclasses.dataclass(frozen=True)
class Example:
  width: int = option(min=1, doc="units per layer")
  kind: str = option("a", choices=("a", "b"))
  widths: tuple[int, ...] = (1, 2)
  triple: tuple[int, int, int] = (1, 2, 3)
  flag: bool = False
  limit: float | None = None
  inner: Inner = Inner()
  maybe_inner: Inner | None = None


def _error(config) -> str:
  with pytest.raises(ConfigError) as e:
    validate(config, schema_of(Example))
  return str(e.value)


def test_schema_follows_annotations_and_options():
  schema = schema_of(Example)
  assert set(schema) == {f.name for f in dataclasses.fields(Example)}
  assert schema["width"] == Field(int, min=1, doc="units per layer")
  assert schema["kind"].choices == ("a", "b") and schema["kind"].has_default
  assert schema["widths"].types == (tuple, list)
  assert schema["limit"].optional and schema["limit"].types is float
  assert isinstance(schema["inner"], DefaultedGroup) and schema["inner"]["rate"].max == 1.0


def test_valid_configs_pass_and_defaults_may_be_absent():
  validate({"width": 3}, schema_of(Example))
  validate({"width": 3, "kind": "b", "widths": [4], "triple": (1, 1, 1), "flag": True, "limit": 2,
            "inner": {"rate": 1}, "maybe_inner": {"rate": 0.0}}, schema_of(Example))


@pytest.mark.parametrize("config, message", [
    ({}, "width: missing (valid: int >= 1; units per layer)"),
    ({"width": 0}, "width: 0 is below the minimum (valid: >= 1)"),
    ({"width": True}, "width: expected int, got bool True"),
    ({"width": 1, "kind": "c"}, "kind: 'c' is not a valid choice (valid: 'a', 'b')"),
    ({"width": 1, "widths": []}, "widths: () is not a non-empty sequence of int"),
    ({"width": 1, "widths": [1, "x"]}, "widths: (1, 'x') is not a non-empty sequence of int"),
    ({"width": 1, "triple": [1, 2]}, "triple: (1, 2) is not 3 values of int"),
    ({"width": 1, "inner": {"rate": 2.0}}, "inner.rate: 2.0 is above the maximum (valid: <= 1.0)"),
    ({"width": 1, "inner": {"speed": 2.0}}, "inner.speed: unknown key (valid: rate)"),
    ({"width": 1, "depth": 2}, "depth: unknown key"),
])
def test_errors_name_the_key(config, message):
  assert _error(config).startswith(message)


def test_unsupported_annotation_is_refused():
  @dataclasses.dataclass
  class Odd:
    value: int | str = 1
  with pytest.raises(TypeError, match="Odd.value"):
    schema_of(Odd)


def test_model_configs_have_no_second_schema():
  """Every model config's schema is the one derived from its dataclass, key for key."""
  from lwjax.models import autoencoder, gpt, unet_diffusion
  for module, cls in ((autoencoder, autoencoder.AutoencoderConfig), (unet_diffusion, unet_diffusion.UNetConfig)):
    assert module.CONFIG_SCHEMA is schema_of(cls)
    assert set(module.CONFIG_SCHEMA) == {f.name for f in dataclasses.fields(cls)}
  # A job's model section: the GPTConfig fields, and the checkpoint to start from (not a field of the model).
  fields = {k: v for k, v in gpt.CONFIG_SCHEMA.items() if k != gpt.PRETRAINED_KEY}
  assert fields == schema_of(gpt.GPTConfig) and set(gpt.CONFIG_SCHEMA) - set(fields) == {gpt.PRETRAINED_KEY}
