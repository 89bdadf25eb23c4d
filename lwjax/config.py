"""Config schemas and validation at the door: a bad key or value becomes one line naming it.

A schema is a nested dict mirroring the ConfigDict: leaves are `Field`s, inner dicts are sub-configs.
`validate(config, schema)` checks every key exists in the schema, every value has the right type and
lies in its choices or range, and raises `ConfigError("<key>: <why> (valid: ...)")` on the first fault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config fault; `str(error)` is the one line `<dotted.key>: <why> (valid: <what is allowed>)`."""

  def __init__(self, key: str, why: str, valid: str = ""):
    self.key, self.why, self.valid = key, why, valid
    super().__init__(f"{key}: {why}" + (f" (valid: {valid})" if valid else ""))


@dataclasses.dataclass(frozen=True)
class Field:
  """One config value: its type(s), allowed choices or range, optional extra check and a doc line."""
  types: type | tuple[type, ...]
  choices: Sequence[Any] | None = None
  min: float | None = None
  max: float | None = None
  check: Callable[[Any], str | None] | None = None  # returns why the value is wrong, or None
  doc: str = ""
  optional: bool = False  # None is allowed

  def validate(self, key: str, value: Any) -> None:
    if value is None:
      if self.optional:
        return
      raise ConfigError(key, "must be set", self._valid())
    types = self.types if isinstance(self.types, tuple) else (self.types,)
    # bool is an int subclass in Python; a bool where a number is expected is a mistake.
    if isinstance(value, bool) and bool not in types:
      raise ConfigError(key, f"expected {_names(types)}, got bool {value!r}", self._valid())
    if float in types and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, types):
      raise ConfigError(key, f"expected {_names(types)}, got {type(value).__name__} {value!r}", self._valid())
    if self.choices is not None and value not in self.choices:
      raise ConfigError(key, f"{value!r} is not a valid choice", ", ".join(map(repr, self.choices)))
    if self.min is not None and value < self.min:
      raise ConfigError(key, f"{value!r} is below the minimum", f">= {self.min}")
    if self.max is not None and value > self.max:
      raise ConfigError(key, f"{value!r} is above the maximum", f"<= {self.max}")
    if self.check is not None and (why := self.check(value)):
      raise ConfigError(key, why, self._valid())

  def _valid(self) -> str:
    if self.choices is not None:
      return ", ".join(map(repr, self.choices))
    parts = [_names(self.types if isinstance(self.types, tuple) else (self.types,))]
    if self.min is not None:
      parts.append(f">= {self.min}")
    if self.max is not None:
      parts.append(f"<= {self.max}")
    return " ".join(parts) + (f"; {self.doc}" if self.doc else "")


def _names(types) -> str:
  return " or ".join(t.__name__ for t in types)


Schema = Mapping[str, "Field | Schema"]


def validate(config: Any, schema: Schema, prefix: str = "") -> None:
  """Validates `config` (ConfigDict or dict) against `schema`; raises ConfigError on the first fault."""
  if isinstance(config, ml_collections.ConfigDict):
    items = config.items()
  elif isinstance(config, Mapping):
    items = config.items()
  else:
    raise ConfigError(prefix.rstrip(".") or "<config>", f"expected a group of keys, got {config!r}",
                      ", ".join(sorted(schema)))
  present = set()
  for key, value in items:
    dotted = prefix + key
    if key not in schema:
      raise ConfigError(dotted, "unknown key", ", ".join(sorted(schema)))
    present.add(key)
    spec = schema[key]
    if isinstance(spec, Field):
      spec.validate(dotted, value)
    else:
      validate(value, spec, dotted + ".")
  for key, spec in schema.items():
    if key not in present and not (isinstance(spec, Field) and spec.optional):
      raise ConfigError(prefix + key, "missing", spec._valid() if isinstance(spec, Field) else "a group")


def positive_int(doc: str = "") -> Field:
  return Field(int, min=1, doc=doc)


def non_negative_int(doc: str = "") -> Field:
  return Field(int, min=0, doc=doc)
