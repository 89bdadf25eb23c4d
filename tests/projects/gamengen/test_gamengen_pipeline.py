"""GameNGen end to end at the smoke scale through main.py: record -> autoencoder -> denoiser -> evaluation ->
GIF, a restart that reuses every stage, and the headless play job on the result; every config validates."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.projects.gamengen.jobs import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
from configs import gamengen  # noqa: E402
from experiments import gamengen_autoencoder, gamengen_demo, gamengen_diffusion, gamengen_eval, gamengen_play  # noqa: E402


def _main(cwd, experiment, arg, workdir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                         os.path.join(ROOT, "experiments", experiment) + f":{arg}", "--workdir", workdir, *overrides],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  cwd = tmp_path_factory.mktemp("demo")
  result = _main(cwd, "gamengen_demo.py", "scale=smoke", "run")
  assert result.returncode == 0, result.stderr[-4000:]
  return cwd, result


def test_smoke_demo_runs_every_stage_and_reports_against_the_baselines(demo):
  cwd, result = demo
  summary = json.loads((cwd / "run" / "metrics.json").read_text())
  metrics = json.loads((cwd / "run" / "eval" / "metrics.json").read_text())
  for key in ("psnr_teacher_forced", "psnr_copy_last_frame", "psnr_autoencoder", "ssim_teacher_forced"):
    assert np.isfinite(metrics[key]) and summary[key] == metrics[key]
  assert set(metrics["psnr_by_ddim_steps"]) == {"1", "4"} and set(metrics["psnr_autoregressive"]) == {"4"}
  assert 0 < metrics["ssim_teacher_forced"] <= 1
  with gzip.open(cwd / "run" / "eval" / "per_window.jsonl.gz", "rt") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == metrics["num_windows"] == 4
  assert np.mean([r["psnr_model"] for r in rows]) == pytest.approx(metrics["psnr_teacher_forced"], rel=1e-5)
  assert np.mean([r["ssim_copy_last_frame"] for r in rows]) == pytest.approx(metrics["ssim_copy_last_frame"], rel=1e-5)
  for m in ("psnr", "ssim"):  # one held-out episode: the windows are resampled
    paired = metrics["paired_vs_copy_last_frame"][m]
    assert paired["ci95"][0] <= paired["mean_diff"] <= paired["ci95"][1]
    assert (paired["n_windows"], paired["n_episodes"], paired["resampled"]) == (4, 1, "windows")
    assert paired["mean_diff"] == pytest.approx(np.mean([r[f"{m}_model"] - r[f"{m}_copy_last_frame"] for r in rows]))
  assert summary["paired_vs_copy_last_frame"] == metrics["paired_vs_copy_last_frame"]
  assert "model minus copy-last-frame: PSNR" in result.stderr
  assert (cwd / "run" / "eval" / "rollout.gif").stat().st_size > 0
  assert (cwd / "run" / "eval" / "rollout.mp4").stat().st_size > 0  # imageio-ffmpeg is in the test extra
  assert list((cwd / "run" / "eval" / "tensorboard").iterdir())
  assert os.path.isdir(cwd / "run" / "autoencoder" / "decoder" / "checkpoints")  # the decoder fine-tuning stage
  # Trained from scratch: the latents are scaled by the factor the run measured, not SD's 0.18215.
  ae_metrics = json.loads((cwd / "run" / "autoencoder" / "metrics.json").read_text())
  from lwjax.projects.gamengen.jobs import train_autoencoder
  assert train_autoencoder.load(str(cwd / "run" / "autoencoder"))[0].cfg.scaling_factor == ae_metrics["scaling_factor"]
  assert ae_metrics["scaling_factor"] != 0.18215
  assert list((cwd / "run" / "diffusion" / "tensorboard").iterdir())
  assert "recorded" in result.stderr and "teacher-forced PSNR" in result.stderr
  from PIL import Image
  for name in ("teacher_forced", "rollout"):  # recorded above generated, one labelled column per frame
    path = cwd / "run" / "eval" / f"{name}.png"
    assert summary["strips"][name] == str(path) and Image.open(path).size[1] > 2 * 60
  assert "frames to look at" in result.stderr


def test_restart_reuses_the_recording_and_the_trained_stages(demo):
  cwd, _ = demo
  again = _main(cwd, "gamengen_demo.py", "scale=smoke", "run")
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in ("record", "autoencoder", "diffusion", "eval"):
    assert f"reusing the finished {stage} stage" in again.stderr


def test_eval_on_a_recordings_dir_shares_windows_between_its_episodes_and_strips_the_longest_horizon(demo, tmp_path):
  cwd, _ = demo
  held_out = tmp_path / "held_out"  # stands in for a fresh recording of the same game
  shutil.copytree(cwd / "run" / "trajectories", held_out)
  result = _main(cwd, "gamengen_eval.py", f"scale=smoke,diffusion={cwd / 'run' / 'diffusion'}", str(tmp_path / "ev"),
                 "--config.eval.horizons=(4, 100000)", f"--config.eval.recordings={held_out}",
                 "--config.eval.episodes=3", "--config.eval.num_windows=6")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "horizon 100000 skipped" in result.stderr
  metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
  assert set(metrics["psnr_autoregressive"]) == {"4"}
  assert (tmp_path / "ev" / "rollout.png").is_file() and (tmp_path / "ev" / "rollout.gif").is_file()
  assert metrics["recordings"] == [str(held_out)]
  with gzip.open(tmp_path / "ev" / "per_window.jsonl.gz", "rt") as f:
    episodes = [json.loads(line)["episode"] for line in f]
  assert sorted(episodes) == [0, 0, 1, 1, 2, 2]  # the first three episodes, two windows each
  paired = metrics["paired_vs_copy_last_frame"]["ssim"]
  assert (paired["n_windows"], paired["n_episodes"], paired["resampled"]) == (
      6, 3, "episodes, then windows within them")


@pytest.mark.parametrize("change,message", [
    (lambda index: index.update(frame_shape=[120, 160, 3]), "frame shape"),
    (lambda index: index.update(actions=index["actions"][:-1]), "action set"),
    (lambda index: index["env_config"].update(tics_per_action=1), "tics_per_action"),
    (None, "one of the run's training recordings"),
])
def test_eval_recordings_of_another_game_or_of_the_training_set_are_refused(demo, tmp_path, change, message):
  cwd, _ = demo
  recordings = cwd / "run" / "trajectories"
  if change:
    index = json.loads((recordings / "index.json").read_text())
    change(index)
    (tmp_path / "index.json").write_text(json.dumps(index))
    recordings = tmp_path
  config = gamengen_eval.get_config(f"scale=smoke,diffusion={cwd / 'run' / 'diffusion'}")
  config.eval.recordings = str(recordings)
  with pytest.raises(ConfigError, match=f"eval.recordings: .*{message}"):
    jobs.get(config)


def test_headless_play_makes_changing_frames_from_the_model(demo, tmp_path):
  cwd, _ = demo
  actions = tmp_path / "actions.txt"
  actions.write_text("1 3\n9 2\n")  # action ids with repeat counts
  result = _main(cwd, "gamengen_play.py", f"diffusion={cwd / 'run' / 'diffusion'},headless=true,steps=1",
                 str(tmp_path / "play"), f"--config.play.actions_file={actions}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "play" / "play" / "play.json").read_text())
  frames = np.load(tmp_path / "play" / "play" / "frames.npy")
  assert summary["steps"] == 5 and frames.shape == (6, 60, 80, 3)
  assert len({f.tobytes() for f in frames}) > 1 and summary["fps"] > 0


def test_bound_frame_function_is_the_frame_with_the_current_parameters(demo, monkeypatch):
  import jax

  from lwjax.projects.gamengen import world_model

  cwd, _ = demo
  model, _ = world_model.load(str(cwd / "run" / "diffusion"))
  h, w, c = model.geometry.latent_shape(4, 8)
  context = jax.random.normal(jax.random.key(0), (1, model.context, h, w, c))
  actions = jax.numpy.arange(model.context, dtype=jax.numpy.int32)[None] % model.cfg.num_actions
  rng = jax.random.key(1)

  def same(got, want):  # XLA folds the parameter-only parts of the bound program: the last digits may differ
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(got[1], np.int32) - np.asarray(want[1], np.int32)).max() <= 1

  bound = model.bound_frame_fn(2)
  same(bound(context, actions, rng), model.next_frame(context, actions, rng, steps=2))
  assert model.bound_frame_fn(2) is bound
  before = np.asarray(bound(context, actions, rng)[0])
  model.unet_params = jax.tree.map(lambda x: 0.5 * x, model.unet_params)  # new weights: recompiled with them
  after = model.bound_frame_fn(2)(context, actions, rng)
  assert model.bound_frame_fn(2) is not bound and not np.allclose(after[0], before, atol=1e-3)
  same(after, model.next_frame(context, actions, rng, steps=2))
  monkeypatch.setattr(world_model, "BIND_MAX_BYTES", 0)  # too large to compile in: passed as arguments
  model.ae_params = model.ae_params  # setting the parameters drops the compiled functions
  same(model.bound_frame_fn(2)(context, actions, rng), after)


@pytest.mark.parametrize("scale", gamengen.SCALES)
def test_every_scale_validates(scale):
  for module, arg in ((gamengen_autoencoder, "data=x"), (gamengen_diffusion, "data=x,autoencoder=y"),
                      (gamengen_demo, "")):
    jobs.get(module.get_config(f"scale={scale}" + (f",{arg}" if arg else "")))
  evaluate.validate_settings(gamengen_eval.get_config(f"scale={scale}"))  # the run itself must exist to validate
  assert gamengen_play.get_config("headless=false").job == "gamengen_play"


@pytest.mark.parametrize("module,arg,key,value,message", [
    (gamengen_diffusion, "data=x,autoencoder=y", "diffusion.context_dropout", 1.5, "diffusion.context_dropout"),
    (gamengen_diffusion, "data=x,autoencoder=", "autoencoder.workdir", None, "autoencoder.workdir: empty"),
    (gamengen_autoencoder, "data=x", "geometry.pad_multiple", 4, "geometry.pad_multiple"),
    (gamengen_eval, "diffusion=/nonexistent", None, None, "diffusion_workdir"),
    (gamengen_play, "diffusion=/nonexistent", None, None, "diffusion_workdir"),
])
def test_config_errors_name_the_key(module, arg, key, value, message):
  config = module.get_config(arg)
  if key and value is not None:
    group, name = key.split(".")
    config[group][name] = value
  with pytest.raises(ConfigError, match=message):
    jobs.get(config)


def test_windows_are_shared_evenly_between_episodes_of_unequal_length():
  from types import SimpleNamespace

  ranges = [range(0, 2), range(2, 52), range(52, 152)]
  windows = SimpleNamespace(windows=SimpleNamespace(episode_windows=lambda: ranges))
  picks = evaluate.picks_across_episodes(windows, 30)
  assert [sum(j in r for j in picks) for r in ranges] == [2, 14, 14]  # the short one's rest goes to the others
  for r in ranges[1:]:  # from the episode's first window to its last, evenly spaced
    inside = picks[(picks >= r.start) & (picks < r.stop)]
    gaps = np.diff(inside)
    assert (inside[0], inside[-1]) == (r.start, r.stop - 1) and gaps.max() - gaps.min() <= 1
  assert list(evaluate.picks_across_episodes(windows, 1000)) == list(range(152))
  assert sorted(evaluate.picks_across_episodes(windows, 3)) == [0, 2, 52]
  sixteen = [range(10 * e, 10 * e + 10) for e in range(16)]
  windows = SimpleNamespace(windows=SimpleNamespace(episode_windows=lambda: sixteen))
  assert list(evaluate.picks_across_episodes(windows, 4)) == [0, 50, 100, 150]  # fewer than episodes: spread
