"""The server as the official `openai` SDK drives it: completions (batched prompts, logprobs equal to the model's own
log-softmax), chat (logprobs, a streamed answer whose first delta carries the role and whose last chunk the usage),
logit_bias, presence / frequency / repetition penalties (the logprobs the model's log-softmax of the penalised
logits), min_tokens and stop_token_ids (vLLM's, through extra_body), streamed logprobs equal to the non-streamed,
fields the server does not implement refused with a 400 naming them, unknown fields refused, and the API key."""

import socket
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

from lwjax.data.tokenizer import ByteTokenizer
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving.engine import LLM, Engine
from lwjax.serving.sampling import SamplingParams
from lwjax.serving.server import ChatMessage, chat_prompt, create_app, make_server

CFG = GPTConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=64)
TOK = ByteTokenizer()
ENGINE = dict(num_pages=64, page_size=4, max_num_seqs=8)
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def model():
  return GPT(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def served(model):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  app = create_app(Engine(model, eos_id=TOK.eos_id, detokenize=TOK.decode, **ENGINE), TOK, model_name="tiny",
                   api_key=KEY)
  server = make_server(app, port=port, log_level="warning")
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}", app
  server.should_exit = True
  thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(served):
  return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _offline(model, prompt: str, max_tokens: int) -> str:
  llm = LLM(model, tokenizer=TOK, **ENGINE)
  return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0][0].text


def _logits(model, tokens: list[int]) -> np.ndarray:
  logits, _ = model.prefill(jnp.array([tokens]), model.init_cache(1, 64))
  return np.asarray(logits[0].astype(jnp.float32))


def _log_softmax(model, tokens: list[int]) -> np.ndarray:
  return np.asarray(jax.nn.log_softmax(_logits(model, tokens), axis=-1))


def test_completions_batched_prompts_and_logprobs(client, model):
  r = client.completions.create(model="tiny", prompt=["Once", "Twice"], max_tokens=5, temperature=0, logprobs=2)
  assert [c.index for c in r.choices] == [0, 1]
  assert [c.text for c in r.choices] == [_offline(model, "Once", 5), _offline(model, "Twice", 5)]
  prompt = [TOK.bos_id] + TOK.encode("Once")
  logprobs = r.choices[0].logprobs
  generated = LLM(model, tokenizer=TOK, **ENGINE).generate(["Once"], SamplingParams(temperature=0.0, max_tokens=5))
  generated = generated[0][0].output  # the server's tokens: its text is this run's (asserted above)
  assert len(logprobs.token_logprobs) == len(generated)
  reference = _log_softmax(model, prompt + generated[:-1])
  for i, token in enumerate(generated):
    np.testing.assert_allclose(logprobs.token_logprobs[i], reference[len(prompt) - 1 + i, token], atol=1e-4)
  assert all(len(top) <= 2 for top in logprobs.top_logprobs)
  assert logprobs.text_offset[0] == len("Once")
  ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
  assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_echo_with_max_tokens_0_scores_a_batch_of_token_prompts(client, model):
  """lm-eval-harness's loglikelihood request: token-id prompts (context + continuation), echo, max_tokens 0,
  logprobs 1: each prompt token's logprob given the tokens before it (the first: None), nothing generated."""
  prompts = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [1, 70, 71, 72]]
  r = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
  assert r.usage.completion_tokens == 0
  for prompt, choice in zip(prompts, r.choices, strict=True):
    assert choice.text == TOK.decode(prompt)
    values = choice.logprobs.token_logprobs
    assert len(values) == len(prompt) and values[0] is None and choice.logprobs.top_logprobs[0] is None
    reference = _log_softmax(model, prompt)
    np.testing.assert_allclose(values[1:], [reference[p - 1, prompt[p]] for p in range(1, len(prompt))], atol=1e-4)
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])


def test_chat_logprobs_and_a_stream_with_role_and_usage(client, model):
  messages = [{"role": "user", "content": "hi"}]
  expected = _offline(model, chat_prompt([ChatMessage(role="user", content="hi")]), 5)
  r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=5, temperature=0,
                                     logprobs=True, top_logprobs=3)
  assert r.choices[0].message.content == expected
  content = r.choices[0].logprobs.content
  assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
  assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
  chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("kwargs, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"logit_bias": {"272": 1}}, "logit_bias"),  # past the vocabulary (272 ids)
    ({"logit_bias": {"5": 101}}, "logit_bias.5"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),  # OpenAI's limit: 300 entries
    ({"extra_body": {"min_tokens": 3}}, "min_tokens"),  # past max_tokens (2)
    ({"extra_body": {"stop_token_ids": [272]}}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"), ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"), ({"extra_body": {"foo": 1}}, "foo"),
    ({"echo": True, "stream": True}, "echo"),
])
def test_what_the_server_does_not_do_is_a_400_naming_the_field(client, kwargs, param):
  with pytest.raises(openai.BadRequestError) as raised:
    result = client.completions.create(model="tiny", prompt="x", **{"max_tokens": 2, **kwargs})
    if kwargs.get("stream"):
      list(result)
  assert raised.value.body["param"] == param, raised.value.body


def test_chat_refuses_tool_roles_and_tools(client):
  with pytest.raises(openai.BadRequestError):
    client.chat.completions.create(model="tiny", messages=[{"role": "developer", "content": "x"}], max_tokens=2)
  with pytest.raises(openai.BadRequestError) as raised:
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                   tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
  assert raised.value.body["param"] == "tools"


def test_the_api_key_is_required_except_for_health(served):
  url, _ = served
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
  assert httpx.get(f"{url}/v1/models").status_code == 401
  assert httpx.get(f"{url}/health").status_code == 200
  assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


LETTERS = TOK.encode("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# The tests below ask for logprobs whenever they process logits, and use the shapes of the tests above: on CPU
# most of their time is compiling the engine's step for a new shape.


def test_logit_bias_of_100_forces_a_token_and_of_minus_100_forbids_it(client):
  z = str(TOK.encode("z")[0])
  r = client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=1.0, seed=3, logit_bias={z: 100},
                                logprobs=1)
  assert r.choices[0].text == "z" * 6 and r.choices[0].logprobs.token_logprobs == pytest.approx([0.0] * 6, abs=1e-4)
  chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        temperature=1.0, seed=3, logit_bias={z: 100}, logprobs=True)
  assert chat.choices[0].message.content == "zzzz"
  # Every id but the 52 letters' (220 entries): the greedy answer of a random model is letters alone.
  banned = {str(t): -100 for t in range(CFG.vocab_size) if t not in LETTERS}
  unbiased = client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0).choices[0].text
  assert not unbiased.isalpha()
  text = client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0, logit_bias=banned,
                                   logprobs=1, extra_body={"ignore_eos": True}).choices[0].text
  assert len(text) == 8 and text.isalpha() and text.isascii(), text


def _penalised(logits: np.ndarray, prompt: list[int], output: list[int], presence=0.0, frequency=0.0,
               repetition=1.0) -> np.ndarray:
  """The log-softmax of one step's logits with OpenAI's and vLLM's penalties applied by hand."""
  counts = np.bincount(output, minlength=logits.shape[-1]).astype(np.float32)
  seen = counts > 0
  seen[prompt] = True
  logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
  logits = logits - frequency * counts - presence * (counts > 0)
  shifted = logits - logits.max()
  return shifted - np.log(np.exp(shifted).sum())


@pytest.mark.parametrize("penalty", [  # each changes this random model's greedy answer (none repeats a token)
    {"presence_penalty": -2.0}, {"frequency_penalty": -2.0}, {"repetition_penalty": 0.3},
    {"presence_penalty": -2.0, "frequency_penalty": 0.7, "repetition_penalty": 2.0}])
def test_each_penalty_changes_the_next_token_distribution_as_its_formula_says(client, model, penalty):
  """Greedy under the penalty, logprobs of the penalised distribution: each token is the argmax of the model's
  own logits penalised by hand over the prompt and the tokens before it, and its logprob theirs, to 1e-4."""
  prompt = [1, 40, 41, 42, 40, 41]
  params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3, **penalty)  # the server's
  output = LLM(model, tokenizer=TOK, **ENGINE).generate([prompt], params)[0][0].output
  r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                extra_body={"ignore_eos": True, **penalty})
  assert r.choices[0].text == TOK.decode(output)
  logits = _logits(model, prompt + output[:-1])
  plain_argmax = []
  for i, token in enumerate(output):
    reference = _penalised(logits[len(prompt) - 1 + i], prompt, output[:i], penalty.get("presence_penalty", 0.0),
                           penalty.get("frequency_penalty", 0.0), penalty.get("repetition_penalty", 1.0))
    assert token == np.argmax(reference)
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[i], reference[token], atol=1e-4)
    top = np.sort(reference)[-3:]  # (the answer's alternatives are keyed by text: bytes past ASCII share a key)
    assert all(np.abs(top - v).min() < 1e-4 for v in r.choices[0].logprobs.top_logprobs[i].values())
    plain_argmax.append(np.argmax(logits[len(prompt) - 1 + i]))
  assert plain_argmax != output  # the penalty changed the greedy answer (a test of nothing otherwise)
  if "frequency_penalty" in penalty:
    assert max(np.bincount(output)) > 1  # counts past 1 were penalised


def test_min_tokens_holds_eos_back_and_stop_token_ids_stop(client, model):
  eos = {str(TOK.eos_id): 100}  # the model would stop at once
  r = client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0, logit_bias=eos, logprobs=1)
  assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1 and r.choices[0].text == ""
  r = client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0, logit_bias=eos, logprobs=1,
                                extra_body={"min_tokens": 4})
  assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5  # 4 held back, then EOS
  assert r.choices[0].logprobs.token_logprobs[-1] == pytest.approx(0.0, abs=1e-4)
  output = LLM(model, tokenizer=TOK, **ENGINE).generate(
      ["Once"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0][0].output
  stop = next(t for i, t in enumerate(output) if i >= 2 and t not in output[:i])
  cut = output.index(stop)
  for stream in (False, True):
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0, stream=stream,
                                  extra_body={"stop_token_ids": [stop], "ignore_eos": True})
    if stream:
      chunks = list(r)
      text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
      text, finish = r.choices[0].text, r.choices[0].finish_reason
      assert r.usage.completion_tokens == cut + 1  # the stop token is in the output, not in the text
    assert (text, finish) == (TOK.decode(output[:cut]), "stop")


def test_streamed_logprobs_equal_the_non_streamed_ones(client):
  body = dict(model="tiny", prompt=["Once", "Twice"], max_tokens=5, temperature=1.0, seed=5, logprobs=3, stop=["q"])
  whole = client.completions.create(**body)
  streamed = {}
  for chunk in client.completions.create(**body, stream=True):
    for c in chunk.choices:
      got = streamed.setdefault(c.index, {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
      for key in got:
        got[key] += getattr(c.logprobs, key)
  assert len(streamed) == 2
  for c in whole.choices:
    expected = c.logprobs.model_dump()
    assert streamed[c.index]["tokens"] == expected["tokens"]
    assert streamed[c.index]["text_offset"] == expected["text_offset"]
    np.testing.assert_allclose(streamed[c.index]["token_logprobs"], expected["token_logprobs"], atol=1e-6)
    for got, want in zip(streamed[c.index]["top_logprobs"], expected["top_logprobs"], strict=True):
      assert got == pytest.approx(want, abs=1e-6)
  chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=1.0, seed=9,
              logprobs=True, top_logprobs=2)
  content = client.chat.completions.create(**chat).choices[0].logprobs.content
  chunks = list(client.chat.completions.create(**chat, stream=True))
  streamed_content = [entry for c in chunks if c.choices and c.choices[0].logprobs
                      for entry in c.choices[0].logprobs.content]
  assert len(streamed_content) == len(content) == 5
  for got, want in zip(streamed_content, content, strict=True):
    assert (got.token, got.bytes) == (want.token, want.bytes) and got.logprob == pytest.approx(want.logprob, abs=1e-6)
    assert [t.logprob for t in got.top_logprobs] == pytest.approx([t.logprob for t in want.top_logprobs], abs=1e-6)
