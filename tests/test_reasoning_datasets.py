"""GSM8K and MATH as reasoning tasks (fixtures written here in each set's published schema, invented problems):
the published splits and the hard one, final-answer grading as the task's checker, problems drawn by seed, a
pretrained model's tokenizer required; the GenRM and compute-matched configs that take them, and refuse what
needs a step checker."""

import importlib
import json
import pathlib

import pytest

from lwjax import candidates, jobs, reasoning_tasks
from lwjax.config import ConfigError
from lwjax.data import hf_tokenizer

TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tokenizers" / "llama3_style"


def _gsm8k_row(i: int, steps: int) -> dict:
  """An invented GSM8K-style problem: `steps` additions, one line each, then `#### N`."""
  lines, total = [], i
  for step in range(steps):
    lines.append(f"Then {total}+{step + 1}=<<{total}+{step + 1}={total + step + 1}>>{total + step + 1}.")
    total += step + 1
  return {"question": f"Sam starts with {i} marbles and adds 1, 2, ... {steps}. How many?",
          "answer": "\n".join(lines) + f"\n#### {total:,}"}


def _write_gsm8k(root: pathlib.Path) -> None:
  root.mkdir(parents=True, exist_ok=True)
  for split, count in (("train", 12), ("test", 10)):
    rows = [_gsm8k_row(100 * i + (split == "test"), 2 + i % 5) for i in range(count)]
    (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_math(root: pathlib.Path) -> None:
  for split, count in (("train", 6), ("test", 8)):
    rows = [{"problem": f"Compute ${i}/2$.", "solution": f"Halving, ${i}/2=\\boxed{{\\frac{{{i}}}{{2}}}}$.",
             "level": f"Level {1 + i % 5}", "type": "Prealgebra"} for i in range(1, count * 2, 2)]
    (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gsm8k_is_a_task_of_its_published_splits_graded_on_the_final_number(tmp_path):
  _write_gsm8k(tmp_path)
  task = reasoning_tasks.get("gsm8k", path=str(tmp_path))
  assert task.tokenizer is None and not task.step_checker
  train, test = task.records(12, seed=0, split="train"), task.records(10, seed=0, split="test")
  assert not {r["question"] for r in train} & {r["question"] for r in test}
  assert task.records(5, seed=3, split="test") == task.records(5, seed=3, split="test")  # the seed picks them
  assert task.records(5, seed=3, split="test") != task.records(5, seed=4, split="test")
  hard = task.records(4, seed=0, split="hard")  # the test problems of 5 or more solution lines
  assert all(len(r["solution"].split("####")[0].splitlines()) >= reasoning_tasks.GSM8K_HARD_STEPS for r in hard)
  for record in test:
    verdict = task.check(record, record["solution"])
    assert verdict.correct and verdict.answer_correct and task.answer(record["solution"]) == record["answer"]
    wrong = record["solution"].rsplit("####", 1)[0] + f"#### {int(record['answer']) + 1}"
    assert not task.check(record, wrong).answer_correct and task.check(record, wrong).error_kind == "answer"
    assert task.check(record, f"So the answer is {int(record['answer']):,} marbles.").correct
  with pytest.raises(ValueError, match="10 problems asked.*has 4"):
    task.records(10, seed=0, split="hard")


def test_math_grades_the_boxed_answer_by_equivalence_and_its_hard_split_is_level_5(tmp_path):
  _write_math(tmp_path)
  task = reasoning_tasks.get("math", path=str(tmp_path))
  test = task.records(8, seed=0, split="test")
  assert [r["level"] for r in task.records(1, seed=0, split="hard")] == ["Level 5"]
  record = next(r for r in test if r["problem"] == "Compute $3/2$.")
  assert task.check(record, "It is $\\boxed{1.5}$.").correct  # 1.5 == 3/2
  assert task.check(record, "It is $\\boxed{\\dfrac{3}{2}}$.").correct
  assert not task.check(record, "It is $\\boxed{\\frac{2}{3}}$.").correct
  assert task.answer("so $\\boxed{\\dfrac{3}{2}}$") == task.answer("so $\\boxed{\\frac{3}{2}}$")


def test_a_data_set_is_read_through_a_pretrained_models_tokenizer(tmp_path):
  _write_gsm8k(tmp_path)
  task = reasoning_tasks.get("gsm8k", path=str(tmp_path))
  with pytest.raises(ValueError, match="no tokenizer of its own"):
    candidates.task_for(task, None)
  read = candidates.task_for(task, hf_tokenizer.load(str(TOKENIZER)))
  for record in read.records(4, seed=0, split="test"):
    text = read.tokenizer.decode(read.tokenizer.encode(record["solution"]))
    assert text == record["solution"] and read.check(record, text).correct
  with pytest.raises(ConfigError, match="^task.path"):
    reasoning_tasks.get("math", path="")


def test_configs_take_the_data_sets_and_refuse_what_needs_a_step_checker(tmp_path):
  genrm = importlib.import_module("experiments.genrm")
  jobs.get(genrm.get_config(f"scale=smoke,task=gsm8k,verifier=direct,path={tmp_path}"))
  with pytest.raises(ConfigError, match="^rationales.base_url: empty"):
    jobs.get(genrm.get_config(f"scale=smoke,task=math,verifier=cot,path={tmp_path}"))
  with pytest.raises(ConfigError, match="^task.path"):
    jobs.get(genrm.get_config("scale=smoke,task=gsm8k,verifier=judge"))
  solver = importlib.import_module("experiments.genrm_solver")
  with pytest.raises(ConfigError, match="^model.pretrained"):
    jobs.get(solver.get_config(f"scale=smoke,task=gsm8k,path={tmp_path}"))
  matched = importlib.import_module("experiments.compute_matched")
  jobs.get(matched.get_config(f"scale=smoke,task=math,path={tmp_path}"))
  with pytest.raises(ConfigError, match="^task.path"):
    jobs.get(matched.get_config("scale=smoke,task=math"))


@pytest.mark.slow
def test_genrm_judges_gsm8k_candidates_of_a_hugging_face_model(tmp_path, monkeypatch):
  """GenRM end to end on GSM8K files: a Hugging Face checkpoint samples the candidates through its tokenizer,
  each graded on its final number, and judges them itself (the paper's LLM-as-a-judge)."""
  import shutil

  from lwjax.models import hf_checkpoint
  from lwjax.models.gpt import GPTConfig
  monkeypatch.chdir(tmp_path)
  _write_gsm8k(tmp_path / "gsm8k")
  shutil.copytree(TOKENIZER, tmp_path / "hf", ignore=shutil.ignore_patterns("expected.json"))
  hf_checkpoint.save_random(GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                      d_ff=64, max_seq_len=512), tmp_path / "hf", scale=0.3)
  config = importlib.import_module("experiments.genrm").get_config(
      f"scale=smoke,task=gsm8k,verifier=judge,path={tmp_path / 'gsm8k'},base={tmp_path / 'hf'}")
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  metrics = jobs.get(config).run(config, str(tmp_path / "judge"))
  assert metrics["task"] == "gsm8k" and metrics["step_checker"] is False and metrics["base_step"] == 0
  for split in ("test", "hard"):
    assert metrics[split]["num_problems"] == config.candidates.num_test
    assert metrics[split]["full"] == metrics[split]["answer"]  # no step checker: the same verdicts
  problems, _ = candidates.read(str(next((tmp_path / "runs").rglob("gsm8k_test_*.arrayrecord"))))
  task = reasoning_tasks.get("gsm8k", path=str(tmp_path / "gsm8k"))
  for p in problems:
    for c in p["candidates"]:
      assert c["answer_correct"] == task.check(p["record"], c["text"]).answer_correct


def test_few_shot_prompts_are_the_papers_formats_from_the_training_files(tmp_path, monkeypatch):
  """4-shot GSM8K (`Question:`/`Answer:`) and Minerva MATH (`Problem:`/`Solution:`) prompts whose exemplars are
  the first training problems of the files (then left out of the training split); a sampled continuation cut at
  the next problem before it is graded; the configs thread `task.fewshot` to the candidate sets' settings (absent
  at 0, so sets sampled before stay valid); the generated tasks refuse it."""
  import numpy as np
  from flax import nnx

  from lwjax.data import math_sets
  from lwjax.models.gpt import GPT, GPTConfig
  from lwjax.projects.compute_matched import job as matched_job
  from lwjax.projects.genrm import job as genrm_job
  from lwjax.serving import batch_sampler
  _write_gsm8k(tmp_path / "gsm8k")
  (tmp_path / "math").mkdir()
  _write_math(tmp_path / "math")
  train = math_sets.load("gsm8k", tmp_path / "gsm8k", "train")
  task = reasoning_tasks.get("gsm8k", path=str(tmp_path / "gsm8k"), fewshot=2)
  record = task.records(1, seed=0, split="test")[0]
  assert task.prompt(record) == (f"Question: {train[0]['question']}\nAnswer: {train[0]['solution']}\n\n"
                                 f"Question: {train[1]['question']}\nAnswer: {train[1]['solution']}\n\n"
                                 f"Question: {record['question']}\nAnswer:")
  assert task.zero_shot().prompt(record) == record["question"]
  assert not {r["question"] for r in task.records(10, seed=0, split="train")} & {t["question"] for t in train[:2]}
  with pytest.raises(ValueError, match="11 problems asked.*has 10"):
    task.records(11, seed=0, split="train")
  assert task.trim(" It is 5.\n#### 5\n\nQuestion: Tom has 3 ...\nAnswer: 3") == "It is 5.\n#### 5"
  math_train = math_sets.load("math", tmp_path / "math", "train")
  math_task = reasoning_tasks.get("math", path=str(tmp_path / "math"), fewshot=1)
  problem = math_task.records(1, seed=0, split="test")[0]
  assert math_task.prompt(problem) == (f"Problem:\n{math_train[0]['problem']}\n\nSolution:\n"
                                       f"{math_train[0]['solution']}\n\nProblem:\n{problem['problem']}\n\nSolution:")
  assert math_task.trim("\n$\\boxed{3}$\n\nProblem:\nCompute $1+1$.") == "$\\boxed{3}$"
  with pytest.raises(ConfigError, match="^task.fewshot"):
    reasoning_tasks.get("igsm", fewshot=4)
  with pytest.raises(ConfigError, match="^task.fewshot: 6 exemplars"):
    reasoning_tasks.get("math", path=str(tmp_path / "math"), fewshot=6)

  # Sampling: the continuation is cut at the next "Question:" and graded as cut.
  read = candidates.task_for(task, hf_tokenizer.load(str(TOKENIZER)))
  tests = read.records(2, seed=0, split="test")
  drawn = [[(f"So #### {r['answer']}\n\nQuestion: Ann has 2 apples.\nAnswer: #### 7", 9)] for r in tests]
  monkeypatch.setattr(batch_sampler, "sample_texts", lambda *args, **kwargs: drawn)
  model = nnx.eval_shape(lambda: GPT(GPTConfig(vocab_size=448, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                                head_dim=8, d_ff=32, max_seq_len=1024), rngs=nnx.Rngs(0)))
  problems, stats = candidates.sample(model, read, tests, n=1, temperature=1.0, max_new_tokens=16)
  for p in problems:
    c = p["candidates"][0]
    assert c["text"] == f"So #### {p['record']['answer']}" and c["answer_correct"] and c["num_tokens"] == 9
  assert stats["generated_tokens"] == 18 and np.isfinite(stats["answer_accuracy"])

  genrm = importlib.import_module("experiments.genrm")
  matched = importlib.import_module("experiments.compute_matched")
  for module, job in ((genrm, genrm_job), (matched, matched_job)):
    config = module.get_config(f"scale=smoke,task=gsm8k,path={tmp_path / 'gsm8k'},fewshot=4")
    jobs.get(config)
    assert job.task_options(config)["fewshot"] == 4 and job.get_task(config).exemplars
    assert "fewshot" not in job.task_options(module.get_config(f"scale=smoke,task=gsm8k,path={tmp_path}"))
    with pytest.raises(ConfigError, match="^task.fewshot"):
      jobs.get(module.get_config("scale=smoke,task=igsm,fewshot=4"))
