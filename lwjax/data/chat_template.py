"""Chat templates rendered as transformers' `apply_chat_template` renders them (transformers 5).

A chat template is a Jinja program shipped with a model (Hub templates are untrusted code). It runs in
jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks` on, the `loopcontrols`
extension (`{% break %}`, `{% continue %}`), a `{% generation %}` block that renders its body, and
transformers' globals and filters: `raise_exception(message)` (a `ChatTemplateError` here), `strftime_now(fmt)`
(local time), a `tojson` that does not escape HTML and keeps non-ASCII text, and a `namespace` that refuses
underscore names. The template sees `messages` (None-valued keys dropped), `add_generation_prompt`, `tools`
and `documents` (None unless given), the tokenizer's special tokens as strings (`bos_token`, `eos_token`, ...)
and any extra keyword arguments, which win over the special tokens.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils


class ChatTemplateError(ValueError):
  """A chat template that does not compile or refuses a conversation; the message names the template's source."""


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: marks the assistant's text for transformers' assistant masks;
  rendering keeps the body as is."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """Jinja's `namespace()` without underscore attributes (no reach into Python internals)."""

  def __init__(*args, **kwargs):  # noqa: N805 - jinja's signature, so that `namespace(self=...)` works
    self, attrs = args[0], dict(*args[1:], **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r} on a namespace")


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def _make_dict(*args, **kwargs):
  return dict(*args, **kwargs)


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                     dict=_make_dict)
  return env


@functools.lru_cache(maxsize=32)
def compile_template(template: str, source: str = "<chat template>") -> jinja2.Template:
  """The compiled template (cached); a syntax error is a ChatTemplateError naming `source` and the line."""
  try:
    return _environment().from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat template {source}, line {e.lineno}: {e.message}") from None


def select_template(templates: str | Mapping[str, str] | Sequence[Mapping[str, str]], name: str | None = None, *,
                    tools: Sequence | None = None, source: str = "<chat template>") -> str:
  """The template to render, by transformers' rule: a single template is itself; of named templates (a dict, or
  the list of {"name", "template"} that tokenizer_config.json holds), `name` if given, else "tool_use" when
  tools are given and it exists, else "default". A `name` that is not a template's name is itself a template."""
  if isinstance(templates, str):
    return name or templates
  named = templates if isinstance(templates, Mapping) else {t["name"]: t["template"] for t in templates}
  if name is not None:
    return named.get(name, name)
  if tools is not None and "tool_use" in named:
    return named["tool_use"]
  if "default" in named:
    return named["default"]
  raise ChatTemplateError(f"chat templates of {source} have no 'default' one; name one of {sorted(named)}")


def render(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str] | None = None, tools: Sequence | None = None,
           documents: Sequence | None = None, source: str = "<chat template>", **kwargs) -> str:
  """The conversation as `template` renders it (see the module docstring for what the template sees).

  An empty conversation, a template's `raise_exception`, or any error the template hits is a ChatTemplateError
  naming `source` (e.g. the tokenizer's chat_template.jinja).
  """
  if not messages:
    raise ChatTemplateError(f"chat template {source}: Cannot apply chat template to an empty conversation. Provide at "
                            "least one message.")
  compiled = compile_template(template, source)
  messages = [{key: value for key, value in dict(m).items() if value is not None} for m in messages]
  variables = {**(special_tokens or {}), **kwargs}
  try:
    return compiled.render(messages=messages, tools=tools, documents=documents,
                           add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.TemplateError as e:
    raise ChatTemplateError(f"chat template {source}: {e.message or type(e).__name__}") from e
  except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
    raise ChatTemplateError(f"chat template {source}: {type(e).__name__}: {e}") from e
