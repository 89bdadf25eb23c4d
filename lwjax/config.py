"""Config schemas and validation at the door: a bad key or value becomes one line naming it.

A schema is a nested dict mirroring the ConfigDict: leaves are `Field`s, inner dicts are sub-configs.
`validate(config, schema)` checks every key exists in the schema, every value has the right type and
lies in its choices or range, and raises `ConfigError("<key>: <why> (valid: ...)")` on the first fault.

A config that is a dataclass (a model's shape, a game's settings) is written once: its fields declare
their rules with `option(...)` and `schema_of(cls)` derives the schema from the annotations (types, `X |
None`, tuples, nested dataclasses) and that metadata, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types as pytypes
import typing
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
  optional: bool = False  # None is allowed (and the key may be absent)
  has_default: bool = False  # the key may be absent (the dataclass default applies)

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


class DefaultedGroup(dict):
  """A sub-schema whose whole group may be absent (a nested dataclass field with a default)."""


def validate(config: Any, schema: Schema, prefix: str = "") -> None:
  """Validates `config` (ConfigDict or dict) against `schema`; raises ConfigError on the first fault."""
  if isinstance(config, (ml_collections.ConfigDict, Mapping)):
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
    may_be_absent = (spec.optional or spec.has_default) if isinstance(spec, Field) else isinstance(
        spec, DefaultedGroup)
    if key not in present and not may_be_absent:
      raise ConfigError(prefix + key, "missing", spec._valid() if isinstance(spec, Field) else "a group")


def positive_int(doc: str = "") -> Field:
  return Field(int, min=1, doc=doc)


def _int_list_check(value: str) -> str | None:
  try:
    items = [int(v) for v in value.split(",")]
  except ValueError:
    return "expected comma-separated integers, e.g. '1,2,4,8'"
  return None if items and min(items) >= 1 else "expected integers >= 1"


def int_list(doc: str = "") -> Field:
  """A string of comma-separated positive integers ("1,2,4,8"); `parse_ints` reads it."""
  return Field(str, check=_int_list_check, doc=doc)


def parse_ints(value: str) -> tuple[int, ...]:
  return tuple(int(v) for v in value.split(","))


def non_negative_int(doc: str = "") -> Field:
  return Field(int, min=0, doc=doc)


_OPTION_KEY = "lwjax.config"


def option(default: Any = dataclasses.MISSING, *, choices: Sequence[Any] | None = None, min: float | None = None,
           max: float | None = None, check: Callable[[Any], str | None] | None = None, doc: str = ""):
  """A dataclass field carrying its validation rules for `schema_of` (its type comes from the annotation)."""
  rules = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max, "check": check,
           "doc": doc}
  return dataclasses.field(default=default, metadata={_OPTION_KEY: rules})


def _unwrap_optional(annotation) -> tuple[Any, bool]:
  """(X, True) for `X | None` / Optional[X], else (annotation, False)."""
  if typing.get_origin(annotation) in (typing.Union, pytypes.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != len(typing.get_args(annotation)):
      return functools.reduce(operator.or_, args), True
  return annotation, False


def _sequence_check(args: tuple) -> Callable[[Any], str | None]:
  """The element check a `tuple[int, ...]` or `tuple[int, int, int]` annotation implies."""
  variadic = len(args) == 2 and args[1] is Ellipsis
  element_types = (args[0],) if variadic else tuple(dict.fromkeys(args))

  def check(value) -> str | None:
    def ok(v, t):
      if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
      return isinstance(v, t) and (t is bool or not isinstance(v, bool))
    kinds = " or ".join(t.__name__ for t in element_types)
    if variadic:
      if not value or not all(ok(v, args[0]) for v in value):
        return f"{tuple(value)!r} is not a non-empty sequence of {kinds}"
    elif len(value) != len(args) or not all(ok(v, t) for v, t in zip(value, args, strict=False)):
      return f"{tuple(value)!r} is not {len(args)} values of {kinds}"
    return None
  return check


def _both(first, second):
  if first is None or second is None:
    return first or second
  return lambda value: first(value) or second(value)


@functools.cache
def schema_of(cls: type) -> Schema:
  """The validation schema of a config dataclass, from its annotations and `option(...)` metadata."""
  hints = typing.get_type_hints(cls)
  schema: dict[str, Any] = {}
  for f in dataclasses.fields(cls):
    annotation, optional = _unwrap_optional(hints[f.name])
    has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    if dataclasses.is_dataclass(annotation):
      sub = schema_of(annotation)
      schema[f.name] = DefaultedGroup(sub) if (has_default or optional) else dict(sub)
      continue
    rules = dict(f.metadata.get(_OPTION_KEY, {}))
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
      types, check = (tuple, list), _both(rules.pop("check", None), _sequence_check(typing.get_args(annotation)))
    elif isinstance(annotation, type):
      types, check = annotation, rules.pop("check", None)
    else:
      raise TypeError(f"{cls.__name__}.{f.name}: schema_of cannot validate the annotation {annotation!r}")
    schema[f.name] = Field(types, check=check, optional=optional, has_default=has_default,
                           **{k: v for k, v in rules.items() if k != "check"})
  return schema
