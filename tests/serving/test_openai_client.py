"""The server as the official `openai` SDK drives it: completions (batched prompts, logprobs equal to the model's own
log-softmax), chat (logprobs, a streamed answer whose first delta carries the role and whose last chunk the usage),
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


def _log_softmax(model, tokens: list[int]) -> np.ndarray:
  logits, _ = model.prefill(jnp.array([tokens]), model.init_cache(1, 64))
  return np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))


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
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1.0}, "frequency_penalty"),
    ({"logit_bias": {"5": 100}}, "logit_bias"), ({"max_tokens": 0}, "max_tokens"), ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"), ({"extra_body": {"foo": 1}}, "foo"),
    ({"logprobs": 1, "stream": True}, "logprobs"),
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
