"""lm-eval-harness's `local-completions` against the server (slow): a random model in a Hugging Face directory with a
real tokenizer (the Llama-3-style fixture), served through `model.pretrained`; a tiny multiple-choice task and a tiny
generation task read from files this test writes. Each loglikelihood the harness logs equals the engine's own scoring
of the same tokens (its prompt logprobs), each generation the engine's greedy answer.

lm_eval runs from whichever environment has it: `LWJAX_LM_EVAL` (a command, e.g. `/work/hfenv/bin/lm_eval`), else
this interpreter's `python -m lm_eval`, else `lm_eval` on PATH; the test skips when none does. The command it runs
is in README.md ("Serving")."""

import glob
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from benchmarks.serve_overload import start_server
from lwjax.models import hf_checkpoint, pretrained
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving.engine import Engine
from lwjax.serving.sampling import SamplingParams

TOKENIZER = pathlib.Path(__file__).parents[1] / "fixtures" / "hf" / "tokenizers" / "llama3_style"
CFG = GPTConfig(vocab_size=432, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=256)  # the fixture tokenizer's 426 ids, padded
MC_DOCS = [{"question": "The sky is", "choices": ["blue", "green", "very loud"], "label": 0},  # after a space:
           {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},  # the task's target_delimiter
           {"question": "Cats like to", "choices": ["sleep", "bark", "fly south"], "label": 0}]
GEN_DOCS = [{"question": "Name a colour.", "answer": "red"}, {"question": "Say hello.", "answer": "hello"}]
MAX_GEN_TOKS = 8


def lm_eval_command() -> list[str] | None:
  """How to run lm_eval here: LWJAX_LM_EVAL, this interpreter's module, or PATH's; None when none has it."""
  if os.environ.get("LWJAX_LM_EVAL"):
    return shlex.split(os.environ["LWJAX_LM_EVAL"])
  if importlib.util.find_spec("lm_eval") is not None:
    return [sys.executable, "-m", "lm_eval"]
  found = shutil.which("lm_eval")
  return [found] if found else None


def _write_tasks(directory: pathlib.Path) -> None:
  directory.mkdir()
  for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
  (directory / "lwjax_tiny_mc.yaml").write_text(
      "task: lwjax_tiny_mc\n" + data.format(directory / "mc.jsonl") +
      "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\ndoc_to_choice: choices\n"
      "metric_list:\n  - metric: acc\n")
  (directory / "lwjax_tiny_gen.yaml").write_text(
      "task: lwjax_tiny_gen\n" + data.format(directory / "gen.jsonl") +
      "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: '{{answer}}'\n"
      f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")


def _samples(out: pathlib.Path, task: str) -> list[dict]:
  files = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
  assert len(files) == 1, files
  return [json.loads(line) for line in pathlib.Path(files[0]).read_text().splitlines()]


@pytest.mark.slow
def test_lm_eval_harness_scores_what_the_engine_scores(tmp_path):
  command = lm_eval_command()
  if command is None:
    pytest.skip("lm_eval is not importable here, LWJAX_LM_EVAL is unset and no lm_eval is on PATH")
  model_dir = tmp_path / "model"
  model = GPT(CFG, rngs=nnx.Rngs(0))
  hf_checkpoint.save(model, str(model_dir))
  shutil.copytree(TOKENIZER, model_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("expected.json"))
  _write_tasks(tmp_path / "tasks")
  out = tmp_path / "out"
  server, url = start_server(str(tmp_path / "serve"), f"--config.model.pretrained={model_dir}",
                             "--config.server.model_name=tiny")
  try:
    model_args = (f"model=tiny,base_url={url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
                  "tokenized_requests=True,max_retries=1,timeout=120")
    run = subprocess.run([*command, "--model", "local-completions", "--model_args", model_args, "--include_path",
                          str(tmp_path / "tasks"), "--tasks", "lwjax_tiny_mc,lwjax_tiny_gen", "--output_path", str(out),
                          "--log_samples"],
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
  finally:
    server.terminate()
    server.wait(timeout=60)

  tokenizer = pretrained.load_tokenizer(str(model_dir))
  engine = Engine(model, num_pages=64, page_size=16, max_num_seqs=8, eos_id=tokenizer.eos_id,
                  stop_ids=tokenizer.eos_ids, detokenize=tokenizer.decode)
  scored = []
  for sample in _samples(out, "lwjax_tiny_mc"):  # arguments: {gen_args_i: {arg_0: context, arg_1: continuation}}
    for args, ((loglikelihood, _),) in zip(sample["arguments"].values(), sample["resps"], strict=True):
      ids = tokenizer.encode(args["arg_0"] + args["arg_1"])  # what the harness sends: context + continuation, no BOS
      start = len(tokenizer.encode(args["arg_0"]))
      request = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
      scored.append((request, start, float(loglikelihood)))
  generated = []
  for sample in _samples(out, "lwjax_tiny_gen"):
    args = sample["arguments"]["gen_args_0"]
    request = engine.add_request(tokenizer.encode(args["arg_0"]), SamplingParams(
        max_tokens=MAX_GEN_TOKS, temperature=0.0, stop=tuple(args["arg_1"]["until"])))
    generated.append((request, sample["resps"][0][0]))
  engine.run_until_done()
  assert len(scored) == sum(len(d["choices"]) for d in MC_DOCS) and len(generated) == len(GEN_DOCS)
  for request, start, loglikelihood in scored:
    ours = sum(request.prompt_logprobs[p][0] for p in range(start, len(request.prompt)))
    np.testing.assert_allclose(loglikelihood, ours, atol=1e-4)
  for request, text in generated:
    assert text == request.text
