"""The LLM judge over HTTP: verdicts read robustly (unreadable ones None), a stub OpenAI-compatible endpoint that
judges compact iGSM with the exact step checker agrees with it on every candidate (and a garbling one does not),
answers cached so a rerun asks nothing, failures retried with backoff and refusals raised; and the judge end to
end against lwjax's own server."""

import http.server
import json
import random
import socket
import threading
import time

import pytest

from lwjax import judge as judge_lib, reasoning_tasks
from lwjax.data import igsm

VERDICTS = [("Yes", True), ("yes.", True), ("**Yes**", True), ("  YES!", True), ("No", False), ("no.", False),
            ("No, the second step adds the wrong numbers.", False), ("**NO** - step 2 is wrong", False),
            ("Step 1 is right, step 2 too. Final answer: Yes", True), ("The steps check out.\nAnswer: no.", False),
            ("I think the answer is yes", True), ("Verdict - NO", False),
            ("Every step is correct, so yes", True), ("", None), ("Maybe", None), ("Nope", None),
            ("Whether yes or no is unclear", None), ("¯\\_(ツ)_/¯", None)]


@pytest.mark.parametrize("text, verdict", VERDICTS)
def test_parse_verdict(text, verdict):
  assert judge_lib.parse_verdict(text) is verdict


class StubEndpoint:
  """An OpenAI-compatible chat endpoint on localhost: the answer to a prompt is `answer(prompt)`; the first
  `fail_first` requests get a 503. `base_url` ends in /v1, as the SDK's does; `requests` counts what came in."""

  def __init__(self, answer, fail_first: int = 0):
    self.answer, self.fail_first, self.requests, self.bodies = answer, fail_first, 0, []
    stub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
          stub.requests += 1
          failing = stub.requests <= stub.fail_first
          stub.bodies.append(body)
        if self.path != "/v1/chat/completions":
          return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if failing:
          return self._send(503, {"error": {"message": "busy"}})
        content = stub.answer(body["messages"][-1]["content"])
        self._send(200, {"object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})

      def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    lock = threading.Lock()
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

  def __enter__(self):
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()


def between(text: str, start: str, end: str) -> str:
  return text.split(start, 1)[1].split(end, 1)[0]


def checker_answer(records: list[dict]):
  """The answer of a judge that is the exact iGSM checker: it reads the problem and the candidate out of the
  default prompt and checks every step."""
  by_question = {r["question"]: r for r in records}

  def answer(prompt: str) -> str:
    record = by_question[between(prompt, "Problem:\n", "\n\nReference solution")]
    candidate = between(prompt, "Student's solution:\n", "\n\nIs every step")
    return "Yes." if igsm.check(igsm.problem_of(record), candidate).correct else "No, a step is wrong."

  return answer


def lucky_candidates(records: list[dict]) -> list[tuple[dict, str]]:
  """Right-answer candidates of compact iGSM: the reference, and one whose first step is wrong but whose answer
  is right (a false positive of an answer-only filter)."""
  out = []
  for record in records:
    sentences = record["solution"].split(" . ")
    words = sentences[0].split()
    words[-1] = str((int(words[-1]) + 1) % 23)
    out += [(record, record["solution"]), (record, " . ".join([" ".join(words)] + sentences[1:]))]
  return out


def test_judge_agrees_with_the_exact_checker_on_compact_igsm(tmp_path):
  task = reasoning_tasks.get("igsm")
  records = task.records(8, seed=0, split="train")
  pairs = lucky_candidates(records)
  exact = [task.check(r, text) for r, text in pairs]
  assert all(v.answer_correct for v in exact) and not all(v.correct for v in exact)
  items = [(r["question"], r["solution"], text) for r, text in pairs]
  with StubEndpoint(checker_answer(records)) as stub:
    judge = judge_lib.Judge(stub.base_url, "checker", workers=3)
    judgements = judge.judge(items)
  summary = judge_lib.summary(judgements, [v.correct for v in exact])
  assert summary["agreement"] == 1.0 and summary["unparsed"] == 0 and summary["n"] == len(pairs)
  assert summary["false_positive_rate"] == summary["exact_false_positive_rate"] == pytest.approx(
      sum(not v.correct for v in exact) / len(exact))
  assert summary["false_positive_rate_se"] > 0
  assert {b["temperature"] for b in stub.bodies} == {0.0} and {b["model"] for b in stub.bodies} == {"checker"}

  rng = random.Random(0)
  with StubEndpoint(lambda prompt: rng.choice(["Yes", "No", "I cannot tell.", "Yes and no"])) as garbled:
    noisy = judge_lib.summary(judge_lib.Judge(garbled.base_url, "garbled").judge(items), [v.correct for v in exact])
  assert noisy["unparsed"] > 0 and noisy["n"] + noisy["unparsed"] == len(items) and noisy["agreement"] < 1.0


def test_answers_are_cached_and_a_rerun_asks_nothing(tmp_path):
  cache = tmp_path / "answers.jsonl"
  items = [(f"q{i}", "r", f"c{i}") for i in range(5)] + [("q0", "r", "c0")]  # the repeat is asked once
  with StubEndpoint(lambda prompt: "Yes" if "\nc0\n" in prompt else "No") as stub:
    first = judge_lib.Judge(stub.base_url, "m", cache_path=str(cache)).judge(items)
    assert stub.requests == 5 and [j.verdict for j in first] == [True, False, False, False, False, True]
    with open(cache, "a") as f:
      f.write('{"key": "cut sho')  # a stopped run's last line
    again = judge_lib.Judge(stub.base_url, "m", cache_path=str(cache))
    assert again.judge(items) == first and stub.requests == 5 and again.requests == 0
    other = judge_lib.Judge(stub.base_url, "another-model", cache_path=str(cache))
    other.judge(items[:1])
    assert stub.requests == 6  # the key holds the model


def test_failures_are_retried_with_backoff_and_refusals_raised():
  with StubEndpoint(lambda prompt: "Yes", fail_first=2) as stub:
    judge = judge_lib.Judge(stub.base_url, "m", retries=3, backoff_s=0.01)
    assert judge.judge([("q", "r", "c")])[0].verdict is True and stub.requests == 3
    with pytest.raises(judge_lib.JudgeError, match="404"):
      judge_lib.Judge(stub.base_url.removesuffix("/v1"), "m", retries=3).judge([("q", "r", "c")])
    stub.fail_first = 100
    with pytest.raises(judge_lib.JudgeError, match="no answer after 2 tries"):
      judge_lib.Judge(stub.base_url, "m", retries=1, backoff_s=0.01).judge([("q", "r", "other")])
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
  start = time.time()
  with pytest.raises(judge_lib.JudgeError, match="no answer after 3 tries"):
    judge_lib.Judge(f"http://127.0.0.1:{closed}/v1", "m", retries=2, backoff_s=0.01).judge([("q", "r", "c")])
  assert time.time() - start < 5
  with pytest.raises(Exception, match="^judge.prompt"):
    judge_lib.Judge("http://x/v1", "m", prompt="Is {question} solved?")


@pytest.mark.slow
def test_judge_runs_against_lwjax_server(monkeypatch):
  """Plumbing only: a tiny random model answers, so its verdicts are whatever its text reads as (about 30 s on
  2 busy cores: the server's start and first compiles)."""
  import ml_collections
  from flax import nnx

  from lwjax.data.tokenizer import ByteTokenizer
  from lwjax.models.gpt import GPT, GPTConfig
  from lwjax.serving.engine import Engine
  from lwjax.serving.server import create_app, make_server

  tok = ByteTokenizer()
  model = GPT(GPTConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                        max_seq_len=256), rngs=nnx.Rngs(0))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  app = create_app(Engine(model, eos_id=tok.eos_id, detokenize=tok.decode, num_pages=32, page_size=16,
                          max_num_seqs=2), tok, model_name="tiny", api_key="sk-judge")
  server = make_server(app, port=port, log_level="warning")
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  try:
    monkeypatch.setenv("LWJAX_TEST_JUDGE_KEY", "sk-judge")
    section = ml_collections.ConfigDict({"base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny",
                                         "prompt": "{candidate} ok?", "max_tokens": 2, "workers": 1,
                                         "api_key_env": "LWJAX_TEST_JUDGE_KEY"})
    records = reasoning_tasks.get("igsm").records(2, seed=0, split="train")
    items = [(r["question"], r["solution"], r["solution"]) for r in records]
    judgements = judge_lib.Judge.from_config(section).judge(items)
    assert len(judgements) == 2 and all(isinstance(j.text, str) and j.text for j in judgements)
    assert all(j.verdict is judge_lib.parse_verdict(j.text) for j in judgements)
    monkeypatch.setenv("LWJAX_TEST_JUDGE_KEY", "wrong")
    with pytest.raises(judge_lib.JudgeError, match="401"):
      judge_lib.Judge.from_config(section).judge(items[:1])
    monkeypatch.delenv("LWJAX_TEST_JUDGE_KEY")
    with pytest.raises(Exception, match="^judge.api_key_env"):
      judge_lib.Judge.from_config(section)
  finally:
    server.should_exit = True
    thread.join(timeout=30)
