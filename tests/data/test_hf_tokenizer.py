"""HFTokenizer and chat templates against what transformers' AutoTokenizer gave on the same files.

The fixtures (tests/fixtures/hf/tokenizers/<name>/) and their expected.json were written by
tests/fixtures/hf/make_tokenizers.py with transformers (versions in VERSIONS.json); the slow test rewrites them
when transformers is installed and checks nothing moved.
"""

import datetime
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from lwjax.data import chat_template, hf_tokenizer, tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "hf")
TOKENIZERS = os.path.join(FIXTURES, "tokenizers")
NAMES = ("llama3_style", "gemma_style", "gemma_style_legacy", "qwen_style")


def _expected(name: str) -> dict:
  with open(os.path.join(TOKENIZERS, name, "expected.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
  name = request.param
  return name, tokenizer.load_tokenizer(os.path.join(TOKENIZERS, name)), _expected(name)


def test_strings_equal_transformers(fixture):
  _, tok, expected = fixture
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  for entry in expected["strings"]:
    text, ids, with_special = entry["text"], entry["ids"], entry["ids_with_special"]
    assert tok.encode(text) == ids, text
    assert tok.encode(text, add_special_tokens=True) == with_special, text
    assert [tok.id_to_token(i) for i in with_special] == entry["tokens"], text
    assert [tok.token_to_id(t) for t in entry["tokens"]] == with_special, text
    assert tok.decode(with_special, skip_special_tokens=False) == entry["decode"], text
    assert tok.decode(with_special) == entry["decode_skip_special"], text
    assert [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)] == entry["decode_prefixes"], text
    assert tok.decode([*ids, tok.vocab_size + 5]) == tok.decode(ids)  # ids past the vocabulary are dropped


def test_chat_templates_equal_transformers(fixture):
  name, tok, expected = fixture
  for entry in expected["conversations"]:
    messages, kwargs = entry["messages"], entry["kwargs"]
    if "error" in entry:
      with pytest.raises(chat_template.ChatTemplateError) as raised:
        tok.apply_chat_template(messages, **kwargs)
      assert entry["error"] in str(raised.value) and os.path.join(name, "") in str(raised.value)
      assert isinstance(raised.value, ValueError)
      continue
    for suffix, generation_prompt in (("", False), ("_generation_prompt", True)):
      text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
      assert text == entry["text" + suffix], entry["name"]
      ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, **kwargs)
      assert ids == entry["ids" + suffix], entry["name"]


@pytest.mark.parametrize("name,bos,eos,stops,pad", [
    ("llama3_style", "<|begin_of_text|>", "<|end_of_text|>", ("<|end_of_text|>", "<|eot_id|>"), "<|end_of_text|>"),
    ("gemma_style", "<bos>", "<eos>", ("<eos>", "<end_of_turn>"), "<pad>"),
    ("gemma_style_legacy", "<bos>", "<eos>", ("<eos>", "<end_of_turn>"), "<pad>"),
    ("qwen_style", None, "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>"),
])
def test_special_ids(name, bos, eos, stops, pad):
  tok = hf_tokenizer.load(os.path.join(TOKENIZERS, name))
  ids = _expected(name)["tokenizer"]
  assert tok.bos_id == (None if bos is None else tok.token_to_id(bos)) == ids["bos_token_id"]
  assert tok.eos_id == tok.token_to_id(eos) == ids["eos_token_id"]
  assert tok.eos_ids == tuple(tok.token_to_id(t) for t in stops) == tuple(ids["generation_eos_token_id"])
  assert tok.pad_id == tok.token_to_id(pad)  # Llama-3 has no pad token: its eos pads
  assert tok.pad_id == (ids["pad_token_id"] if ids["pad_token_id"] is not None else ids["eos_token_id"])
  assert tok.vocab_size == ids["len"] and tok.special_tokens_map == ids["special_tokens_map"]


def _copy(name, tmp_path):
  return shutil.copytree(os.path.join(TOKENIZERS, name), tmp_path / name)


def _edit_json(path, **changes):
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  data.update(changes)
  for key in [k for k, v in changes.items() if v is None]:
    del data[key]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def test_special_tokens_map_rules_as_transformers(tmp_path):
  """Without added_tokens_decoder, special_tokens_map.json overrides the config and a token the vocabulary lacks
  gets the next id (what transformers 5.25 gave on these files)."""
  directory = _copy("gemma_style_legacy", tmp_path)
  _edit_json(directory / "tokenizer_config.json", added_tokens_decoder=None)
  _edit_json(directory / "special_tokens_map.json", pad_token="<mask>", sep_token="<sep>")
  tok = hf_tokenizer.load(str(directory))
  assert tok.pad_id == 4 and tok.token_to_id("<sep>") == 523 and tok.vocab_size == 524
  assert tok.encode("a<sep>b", add_special_tokens=True) == [2, 297, 523, 298]
  assert tok.decode(tok.encode("a<sep>b")) == "ab"
  assert hf_tokenizer.load(os.path.join(TOKENIZERS, "gemma_style_legacy")).pad_id == 0  # with it: the config's


def test_a_post_processor_that_contradicts_add_bos_token_wins_and_is_logged(tmp_path, caplog):
  directory = _copy("llama3_style", tmp_path)
  _edit_json(directory / "tokenizer_config.json", add_bos_token=False)
  with caplog.at_level(logging.WARNING):
    tok = hf_tokenizer.load(str(directory))
  assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_id
  assert "add_bos_token=False" in caplog.text and "tokenizer_config.json" in caplog.text


def test_decode_cleans_up_spaces_only_where_transformers_does(tmp_path):
  """clean_up_tokenization_spaces is skipped for BPE models (as llama3_style's expected.json shows) unless forced
  with transformers' corrupt-output flag (the forced output is what transformers 5.25 gave)."""
  directory = _copy("llama3_style", tmp_path)
  _edit_json(directory / "tokenizer_config.json",
             clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
  text = "spaced , punctuation . I 'm"
  tok = hf_tokenizer.load(str(directory))
  assert tok.decode(tok.encode(text)) == "spaced, punctuation. I'm"


def test_a_sentencepiece_only_directory_loads_as_sentencepiece(tmp_path):
  texts = ["hello world", "a small corpus of words", "hello again"] * 20
  model = tokenizer.train_sentencepiece(iter(texts), str(tmp_path / "sp"), vocab_size=300)
  (tmp_path / "dir").mkdir()
  shutil.copy(model, tmp_path / "dir" / "tokenizer.model")
  for path in (str(tmp_path / "dir"), model):
    tok = tokenizer.load_tokenizer(path)
    assert isinstance(tok, tokenizer.SentencePieceTokenizer) and tok.decode(tok.encode("hello world")) == "hello world"
  with pytest.raises(ValueError, match="tokenizer.json.*load_tokenizer"):
    hf_tokenizer.load(str(tmp_path / "dir"))


@pytest.mark.parametrize("breakage,match", [
    ("no_directory", "not a directory"),
    ("empty_directory", "neither tokenizer.json .* nor tokenizer.model"),
    ("tokenizer_json_garbage", r"tokenizer.json: not a `tokenizers` serialization"),
    ("tokenizer_json_unknown_model", r"tokenizer.json: not a `tokenizers` serialization"),
    ("no_tokenizer_config", r"tokenizer_config.json: missing; provide"),
    ("generation_config_garbage", r"generation_config.json: not valid JSON"),
])
def test_missing_or_unknown_files_are_named(tmp_path, breakage, match):
  directory = _copy("qwen_style", tmp_path)
  if breakage == "no_directory":
    directory = tmp_path / "nowhere" / "tokenizer.json"
    match = "does not exist"
  elif breakage == "empty_directory":
    directory = tmp_path / "empty"
    directory.mkdir()
  elif breakage == "tokenizer_json_garbage":
    (directory / "tokenizer.json").write_text("{not json")
  elif breakage == "tokenizer_json_unknown_model":
    _edit_json(directory / "tokenizer.json", model={"type": "Wordless", "vocab": {}})
  elif breakage == "no_tokenizer_config":
    (directory / "tokenizer_config.json").unlink()
  else:
    (directory / "generation_config.json").write_text("eos_token_id: 3")
  with pytest.raises(ValueError, match=match):
    tokenizer.load_tokenizer(str(directory))
  if breakage == "no_directory":
    with pytest.raises(ValueError, match="not a directory"):
      hf_tokenizer.load(str(directory))


def test_named_templates_follow_transformers_rule():
  named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
  assert chat_template.select_template(named) == "D"
  assert chat_template.select_template(named, tools=[{}]) == "T"
  assert chat_template.select_template({"default": "D", "tool_use": "T"}, "tool_use") == "T"
  assert chat_template.select_template(named, "{{ x }}") == "{{ x }}"  # not a name: a template
  assert chat_template.select_template("S", tools=[{}]) == "S"
  with pytest.raises(chat_template.ChatTemplateError, match=r"no 'default'.*\['rag', 'tool_use'\]"):
    chat_template.select_template({"tool_use": "T", "rag": "R"}, source="x/tokenizer_config.json")


def test_the_template_environment():
  def render(template, **kwargs):
    return chat_template.render(template, [{"role": "user", "content": "hi", "name": None}], source="t.jinja",
                                **kwargs)
  assert render("{% for m in messages %}{{ m | tojson }}{% endfor %}") == '{"role": "user", "content": "hi"}'
  assert render("{{ {'a': '<é>'} | tojson(indent=1) }}") == '{\n "a": "<é>"\n}'
  assert render("  {% if true %}\nx\n  {% endif %}\ny") == "x\ny"  # trim_blocks and lstrip_blocks
  assert render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "012"
  assert render("{% generation %}{{ messages[0].content }}{% endgeneration %}") == "hi"
  assert render("{{ bos_token }}{{ tools }}{{ documents }}{{ add_generation_prompt }}", special_tokens={
      "bos_token": "<s>"}, add_generation_prompt=True) == "<s>NoneNoneTrue"
  assert render("{{ bos_token }}|{{ extra }}", special_tokens={"bos_token": "<s>"}, bos_token="[B]", extra=3) == "[B]|3"
  year = render("{{ strftime_now('%Y') }}")
  assert year in {str(datetime.datetime.now().year), str(datetime.datetime.now().year - 1)}
  assert render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                "{{ ns.n }}{{ dict(a=1)['a'] }}") == "11"
  for template, match in (("{{ raise_exception('no ' + messages[0].role) }}", "t.jinja: no user"),
                          ("{% if %}", "t.jinja, line 1: "),
                          ("{{ ''.__class__.__mro__ }}", "t.jinja: .*unsafe"),
                          ("{% set ns = namespace() %}{% set ns._x = 1 %}", "t.jinja: .*_x"),
                          ("{{ messages[0].content + 1 }}", "t.jinja: TypeError")):
    with pytest.raises(chat_template.ChatTemplateError, match=match):
      render(template)


def test_a_tokenizer_without_a_template_says_so(tmp_path):
  directory = _copy("qwen_style", tmp_path)
  (directory / "chat_template.jinja").unlink()
  tok = hf_tokenizer.load(str(directory))
  assert tok.chat_template is None
  with pytest.raises(chat_template.ChatTemplateError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ eos_token }}",
                                 tokenize=True) == [tok.eos_id]


@pytest.mark.slow
def test_the_fixture_script_reproduces_the_committed_fixtures(tmp_path):
  """Regenerates every fixture with the installed transformers; the expected.json files must not move."""
  transformers = pytest.importorskip("transformers")
  subprocess.run([sys.executable, os.path.join(FIXTURES, "make_tokenizers.py"), "--out", str(tmp_path)], check=True,
                 capture_output=True)
  for name in NAMES:
    with open(tmp_path / name / "expected.json", encoding="utf-8") as f:
      assert json.load(f) == _expected(name), f"{name} (transformers {transformers.__version__})"
