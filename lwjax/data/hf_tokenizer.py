"""Hugging Face tokenizers (a `tokenizer.json` directory: Llama-3, Qwen2, Gemma-2) with their chat templates.

`load(directory)` reads what transformers' `save_pretrained` writes and gives an `HFTokenizer`, token-for-token
and text-for-text equal to `transformers.AutoTokenizer.from_pretrained(directory)` (transformers 5; checked
against fixtures it wrote, tests/fixtures/hf), without importing transformers:

  tokenizer.json            the `tokenizers` pipeline: normalizer, pre-tokenizer, model, decoder, and the
                            post-processor, which alone decides whether encode(..., add_special_tokens=True) adds
                            BOS/EOS (transformers 5 ignores tokenizer_config's add_bos_token/add_eos_token once a
                            tokenizer.json exists; a disagreement is logged)
  tokenizer_config.json     the special tokens (strings or AddedToken dicts), added_tokens_decoder, extra special
                            tokens, clean_up_tokenization_spaces, and the chat template(s) of older files
  special_tokens_map.json   read only when tokenizer_config.json has no added_tokens_decoder (transformers' legacy
                            rule); its tokens then override the config's
  generation_config.json    `eos_token_id` (an int or a list): the ids that end a generation
  chat_template.jinja, additional_chat_templates/*.jinja
                            the chat templates transformers 5 writes; they take priority over the config's

transformers 5 rebuilds the pipeline of a few model classes from its own code (GemmaTokenizer, Qwen2Tokenizer)
instead of reading tokenizer.json's; for the files those models ship, both agree (the gemma_style and qwen_style
fixtures are saved through those classes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from etils import epath

from lwjax.data import chat_template as chat_template_lib

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATES_DIR = "additional_chat_templates"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer:
  """A `tokenizers.Tokenizer` behind the shared interface (`encode` without BOS/EOS, `decode` dropping special ids,
  `vocab_size`, `pad_id`, `bos_id`, `eos_id`), plus the stop ids and the chat template of the model.

  `bos_id` is None for a model without BOS (Qwen); `eos_id` is the eos token's id (else the first stop id);
  `eos_ids` are all the ids that end a generation: generation_config's, then the eos token's; `pad_id` is the pad
  token's id, or `eos_id` for a model without one (Llama-3), as batched generation pads with it there.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, special_tokens: Mapping[str, str], *,
               generation_eos_ids: Sequence[int] = (), chat_templates: Mapping[str, str] | None = None,
               template_sources: Mapping[str, str] | None = None, clean_up_spaces: bool = False,
               name: str = "tokenizer"):
    """`special_tokens`: {"bos_token": "<s>", ...} (the strings a chat template sees); `chat_templates`: by name,
    the one used by default named "default"; `template_sources`: template text -> where it was read (errors
    name it); `clean_up_spaces`: transformers' clean_up_tokenization_spaces on decode."""
    self.tokenizer, self.name = tokenizer, name
    self.special_tokens_map = dict(special_tokens)
    self.chat_templates = dict(chat_templates or {})
    self._template_sources = dict(template_sources or {})
    self.clean_up_spaces = clean_up_spaces
    self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1  # one past the largest id
    self.bos_id = self._special_id("bos_token")
    eos = self._special_id("eos_token")
    self.eos_ids = tuple(dict.fromkeys([*generation_eos_ids, *([] if eos is None else [eos])]))
    self.eos_id = eos if eos is not None else (self.eos_ids[0] if self.eos_ids else None)
    pad = self._special_id("pad_token")
    self.pad_id = pad if pad is not None else self.eos_id

  def _special_id(self, key: str) -> int | None:
    token = self.special_tokens_map.get(key)
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def chat_template(self) -> str | None:
    """The template `apply_chat_template` renders by default (None: the model has none)."""
    return self.chat_templates.get("default")

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """The ids of `text`; with `add_special_tokens`, what the post-processor adds too (Llama-3's and Gemma's BOS),
    exactly `AutoTokenizer.from_pretrained(d)(text)["input_ids"]`."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """The text of `ids`; special ids are dropped unless `skip_special_tokens` is False, ids the vocabulary does
    not hold always are (a model's padded vocabulary can emit them)."""
    text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    return _clean_up_tokenization(text) if self.clean_up_spaces else text

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.tokenizer.id_to_token(int(token_id))

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                          tokenize: bool = False, chat_template: str | None = None, tools: Sequence | None = None,
                          documents: Sequence | None = None, **kwargs) -> str | list[int]:
    """The conversation rendered by the model's chat template (`lwjax.data.chat_template.render`): its text, or
    with `tokenize` its ids, encoded without adding special tokens (the template writes them). `chat_template`:
    the name of one of the model's templates, or a template. A template error is a `ChatTemplateError`."""
    if chat_template is None and not self.chat_templates:
      raise chat_template_lib.ChatTemplateError(
          f"{self.name} has no chat template ({CHAT_TEMPLATE_FILE}, or chat_template in {CONFIG_FILE}); pass one "
          "as chat_template=")
    template = chat_template_lib.select_template(self.chat_templates, chat_template, tools=tools, source=self.name)
    source = self._template_sources.get(template, "<chat_template argument>")
    text = chat_template_lib.render(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens_map, tools=tools, documents=documents,
                                    source=source, **kwargs)
    return self.encode(text) if tokenize else text


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
  for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(spaced, joined)
  return text


def _read_json(path: epath.Path, what: str) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}); provide the {what}") from None


def _added_token(value: str | Mapping, special: bool) -> tokenizers.AddedToken:
  """An AddedToken from a config value: a string, or transformers' serialized AddedToken dict."""
  if isinstance(value, str):
    return tokenizers.AddedToken(value, special=special, normalized=not special)
  flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
  return tokenizers.AddedToken(value["content"], **{"special": special, **flags})


def _content(value: str | Mapping | None) -> str | None:
  return value["content"] if isinstance(value, Mapping) else value


def load(directory: str) -> HFTokenizer:
  """The Hugging Face tokenizer of `directory` (any path `etils.epath` reads); see the module docstring for the
  files it reads. A missing or unreadable file raises ValueError naming it and what to provide."""
  root = epath.Path(directory)
  if not root.is_dir():
    raise ValueError(f"{directory}: not a directory; provide a Hugging Face tokenizer directory ({TOKENIZER_FILE}, "
                     f"{CONFIG_FILE})")
  path = root / TOKENIZER_FILE
  if not path.exists():
    hint = " (it holds a sentencepiece tokenizer.model: load it with lwjax.data.tokenizer.load_tokenizer)" if (
        root / "tokenizer.model").exists() else ""
    raise ValueError(f"{path}: missing{hint}; provide the {TOKENIZER_FILE} that transformers' save_pretrained writes")
  try:
    tokenizer = tokenizers.Tokenizer.from_str(path.read_text())
  except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for any format problem
    raise ValueError(f"{path}: not a `tokenizers` serialization ({e}); provide the {TOKENIZER_FILE} that "
                     "transformers' save_pretrained or tokenizers' Tokenizer.save writes") from None
  tokenizer.no_truncation()
  tokenizer.no_padding()
  config_path = root / CONFIG_FILE
  if not config_path.exists():
    raise ValueError(f"{config_path}: missing; provide the {CONFIG_FILE} saved beside {TOKENIZER_FILE} (it names "
                     "the special tokens)")
  config = _read_json(config_path, f"{CONFIG_FILE} that transformers' save_pretrained writes")

  special_tokens = _special_tokens(root, config, tokenizer)
  generation_eos: list[int] = []
  if (root / GENERATION_CONFIG_FILE).exists():
    eos = _read_json(root / GENERATION_CONFIG_FILE, f"{GENERATION_CONFIG_FILE} (or remove it)").get("eos_token_id")
    generation_eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  templates, sources = _chat_templates(root, config)
  model_type = type(tokenizer.model).__name__
  clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
      model_type != "BPE" or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
  result = HFTokenizer(tokenizer, special_tokens, generation_eos_ids=generation_eos, chat_templates=templates,
                       template_sources=sources, clean_up_spaces=clean_up, name=str(root))
  _warn_on_ignored_flags(result, config, config_path)
  return result


def _special_tokens(root: epath.Path, config: Mapping, tokenizer: tokenizers.Tokenizer) -> dict[str, str]:
  """{"bos_token": "<s>", ...}: the config's, or special_tokens_map.json's where transformers reads it. Tokens the
  files name but tokenizer.json lacks are added to `tokenizer` (new ids at the end), as transformers adds them."""
  values = {key: config.get(key) for key in SPECIAL_TOKEN_KEYS}
  map_path = root / SPECIAL_TOKENS_FILE
  if "added_tokens_decoder" not in config and map_path.exists():
    legacy = _read_json(map_path, f"{SPECIAL_TOKENS_FILE} (or remove it)")
    values.update({key: legacy[key] for key in SPECIAL_TOKEN_KEYS if key in legacy})
  extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
  extra = list(extra.values()) if isinstance(extra, Mapping) else list(extra)
  decoder = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0]))
  named = [(v, True) for v in [*values.values(), *extra] if v is not None]
  for value, special in [(v, False) for _, v in decoder] + named:
    if tokenizer.token_to_id(_content(value)) is None:
      tokenizer.add_tokens([_added_token(value, special)])
  return {key: _content(v) for key, v in values.items() if v is not None}


def _chat_templates(root: epath.Path, config: Mapping) -> tuple[dict[str, str], dict[str, str]]:
  """(templates by name, template text -> source): chat_template.jinja ("default") and
  additional_chat_templates/<name>.jinja if any, else the config's chat_template (a string: "default"; a list of
  {"name", "template"})."""
  files = {}
  if (root / CHAT_TEMPLATE_FILE).exists():
    files["default"] = root / CHAT_TEMPLATE_FILE
  if (root / CHAT_TEMPLATES_DIR).is_dir():
    files.update({p.name.removesuffix(".jinja"): p for p in sorted((root / CHAT_TEMPLATES_DIR).glob("*.jinja"))})
  if files:
    templates = {name: p.read_text() for name, p in files.items()}
    return templates, {templates[name]: str(p) for name, p in files.items()}
  value = config.get("chat_template")
  source = str(root / CONFIG_FILE)
  if value is None:
    return {}, {}
  if isinstance(value, str):
    return {"default": value}, {value: f"{source} (chat_template)"}
  templates = {t["name"]: t["template"] for t in value}
  return templates, {text: f"{source} (chat_template {name!r})" for name, text in templates.items()}


def _warn_on_ignored_flags(tok: HFTokenizer, config: Mapping, config_path: epath.Path) -> None:
  """Logs add_bos_token/add_eos_token that the post-processor contradicts (it wins, as in transformers 5)."""
  ids = tok.encode("", add_special_tokens=True)
  for key, token_id, added in (("add_bos_token", tok.bos_id, ids[:1]), ("add_eos_token", tok.eos_id, ids[-1:])):
    if key in config and token_id is not None and bool(config[key]) != (added == [token_id]):
      logging.warning("%s: %s=%s, but %s's post-processor %s it; following the post-processor, as transformers 5 "
                      "does", config_path, key, config[key], TOKENIZER_FILE,
                      "does not add" if config[key] else "adds")
