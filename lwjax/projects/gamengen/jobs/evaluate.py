"""The `gamengen_eval` job: next-frame quality of a trained world model on held-out episodes (arXiv 2408.14837,
sec. 5.1-5.2).

On `eval.num_windows` windows of the held-out episodes of the diffusion run's recordings:
- teacher-forced: the next frame from the true context (recorded frames, encoded) under the recorded
  action; PSNR and SSIM to the recorded frame at model resolution, next to two baselines measured on the
  same windows: copying the last context frame, and the autoencoder's reconstruction of the target
  (the ceiling: the denoiser can at best produce that latent);
- DDIM steps: teacher-forced PSNR for each of `eval.ddim_steps` (the paper's 1/2/4/8 ablation);
- autoregressive: from the first `context` frames of a held-out stretch, the model feeds on its own frames
  under the recorded actions; PSNR of frame n for each n in `eval.horizons` (16/32/64 as episodes allow).
Writes `<workdir>/metrics.json` (`psnr_teacher_forced`, `psnr_copy_last_frame`, `psnr_autoencoder`,
`ssim_teacher_forced`, ...); PNG strips of recorded frames above generated ones with the action under each
column, `teacher_forced.png` (one held-out window per column) and `rollout.png` (the first autoregressive
rollout, evenly spaced frames), also in TensorBoard; and that rollout above the recorded frames as
`<workdir>/rollout.gif`, `rollout.mp4` (with imageio-ffmpeg) and a TensorBoard video (image strip without
moviepy) under `<workdir>/tensorboard`. LPIPS and FVD need pretrained networks that cannot be fetched here:
not reported.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lwjax.config import ConfigError, Field, positive_int, validate as validate_schema
from lwjax.projects.gamengen import metrics as metrics_lib, video, world_model
from lwjax.projects.gamengen.env import ACTION_NAMES
from lwjax.projects.gamengen.record import EpisodeWindows, WindowSource, split_episodes

SCHEMA = {
    "job": Field(str), "seed": Field(int, min=0),
    "diffusion_workdir": Field(str, doc="workdir of the gamengen_diffusion run to evaluate"),
    "eval": {
        "num_windows": positive_int("held-out windows for the teacher-forced metrics"),
        "batch_size": positive_int("windows per sampler call"),
        "steps": positive_int("DDIM steps (the paper: 4)"), "guidance": Field(float, min=0.0),
        "noise_level": Field(float, min=0.0, max=1.0, doc="inference noise-augmentation level of the context"),
        "ddim_steps": Field((list, tuple), doc="DDIM step counts of the steps ablation; [] skips it"),
        "horizons": Field((list, tuple), doc="autoregressive horizons in frames; [] skips the rollouts"),
        "num_rollouts": positive_int("held-out stretches rolled out per horizon"),
    },
}


def validate(config) -> None:
  validate_settings(config)
  if not os.path.isdir(os.path.join(config.diffusion_workdir, "checkpoints")):
    raise ConfigError("diffusion_workdir", f"{config.diffusion_workdir!r} holds no checkpoints/",
                      "the workdir of a gamengen_diffusion run")


def validate_settings(config) -> None:
  """Everything but the run to evaluate (which a pipeline makes first)."""
  validate_schema(config, SCHEMA)
  for key in ("ddim_steps", "horizons"):
    if not all(isinstance(v, int) and v > 0 for v in config.eval[key]):
      raise ConfigError(f"eval.{key}", f"{list(config.eval[key])!r} holds a value that is not a positive int",
                        "a list of positive ints")


def held_out_windows(run_config: dict, context: int) -> WindowSource:
  """Windows of `context` frames from the held-out episodes of a diffusion run (all episodes when none)."""
  recordings = list(run_config["data"]["recordings"])
  n = len(EpisodeWindows(recordings, context=0).all_episodes)
  train_eps, eval_eps = split_episodes(n, run_config["data"]["held_out_episodes"])
  return WindowSource(recordings, context, episodes=eval_eps or train_eps, stride=run_config["data"]["frame_stride"])


def _picks(num_windows: int, n: int) -> np.ndarray:
  return np.unique(np.linspace(0, num_windows - 1, min(n, num_windows)).astype(int))


def teacher_forced(model: world_model.WorldModel, windows: WindowSource, picks, *, batch_size: int, steps_list,
                   key, strip_steps: int | None = None, strip_columns: int = 8) -> dict:
  """PSNR/SSIM of the next frame from the true context, per DDIM step count, and the two baselines; with
  `strip_steps`, "strip": (recorded, generated at that step count, the action names) of the first
  `strip_columns` windows."""
  shrink = model.geometry.shrink
  predicted = {s: [] for s in steps_list}
  copy, recon, targets = [], [], []
  for start in tqdm.tqdm(range(0, len(picks), batch_size), desc="teacher-forced", unit="batch"):
    chunk = [windows[int(j)] for j in picks[start:start + batch_size]]
    chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape; the copies are dropped below
    n = len(picks[start:start + batch_size])
    context = jnp.stack([model.encode(w["frames"]) for w in chunk])
    actions = jnp.asarray(np.stack([w["actions"] for w in chunk]), jnp.int32)
    for s in steps_list:
      _, frames = model.next_frame(context, actions, jax.random.fold_in(key, start), steps=s)
      predicted[s].append(np.asarray(frames)[:n])
    target = np.stack([w["target"] for w in chunk[:n]])
    targets.append(shrink(target))
    copy.append(shrink(np.stack([w["frames"][-1] for w in chunk[:n]])))
    recon.append(model.reconstruct(target))
  targets, copy, recon = (np.concatenate(x) for x in (targets, copy, recon))
  strip = None
  if strip_steps is not None:
    m = min(strip_columns, len(targets))
    captions = [ACTION_NAMES[int(windows[int(j)]["actions"][-1])] for j in picks[:m]]
    strip = (targets[:m], np.concatenate(predicted[strip_steps])[:m], captions)
  result = {"psnr_copy_last_frame": float(metrics_lib.psnr(copy, targets).mean()),
            "psnr_autoencoder": float(metrics_lib.psnr(recon, targets).mean()),
            "ssim_copy_last_frame": float(metrics_lib.ssim(copy, targets).mean()),
            "ssim_autoencoder": float(metrics_lib.ssim(recon, targets).mean()),
            "psnr_by_ddim_steps": {}, "ssim_by_ddim_steps": {}}
  for s, chunks in predicted.items():
    frames = np.concatenate(chunks)
    result["psnr_by_ddim_steps"][str(s)] = float(metrics_lib.psnr(frames, targets).mean())
    result["ssim_by_ddim_steps"][str(s)] = float(metrics_lib.ssim(frames, targets).mean())
  if strip is not None:
    result["strip"] = strip
  return result


def write_strip(out_dir: str, name: str, recorded, generated, captions) -> str:
  """`<out_dir>/<name>.png`: recorded frames above generated ones, each column's caption (its action) under it;
  also into `<out_dir>/tensorboard` as `strips/<name>`. Returns the PNG's path."""
  from tensorboardX import SummaryWriter
  image = video.labelled_strip({"recorded": np.asarray(recorded), "generated": np.asarray(generated)}, captions)
  path = os.path.join(out_dir, f"{name}.png")
  video.write_png(path, image)
  with SummaryWriter(os.path.join(out_dir, "tensorboard")) as writer:
    writer.add_image(f"strips/{name}", image, 0, dataformats="HWC")
  return path


def autoregressive(model: world_model.WorldModel, run_config: dict, horizons, num_rollouts: int, key,
                   out_dir: str | None) -> tuple[dict, str | None]:
  """PSNR of generated frame n (n in `horizons`) under the recorded actions, from recorded contexts, and the
  path of the first rollout's strip at the longest horizon the held-out episodes hold (when `out_dir` is given)."""
  context, result, strip = model.context, {}, None
  stretches_by_horizon = {}
  for horizon in sorted(horizons):
    stretches_by_horizon[horizon] = held_out_windows(run_config, context + horizon - 1)
    if not len(stretches_by_horizon[horizon]):
      logging.warning("no held-out episode holds %d + %d frames: horizon %d skipped", context, horizon, horizon)
  runnable = [horizon for horizon, stretches in stretches_by_horizon.items() if len(stretches)]
  for horizon in runnable:
    stretches = stretches_by_horizon[horizon]
    psnrs = []
    for r, j in enumerate(_picks(len(stretches), num_rollouts)):
      w = stretches[int(j)]
      frames = np.concatenate([w["frames"], w["target"][None]])  # context + horizon recorded frames
      actions = w["actions"]  # actions[k] is held from frames[k] to frames[k + 1]
      ctx = model.encode(frames[:context])[None]
      ctx_actions = jnp.asarray(actions[:context], jnp.int32)[None]
      # Generated frame i stands for frames[context + i]; the action held from it is actions[context + i].
      future = jnp.asarray(np.pad(actions[context:], (0, 1)), jnp.int32)[None]
      _, generated = model.rollout(ctx, ctx_actions, future, jax.random.fold_in(key, r))
      generated = np.asarray(generated[0])
      truth = model.geometry.shrink(frames[context:])
      psnrs.append(float(metrics_lib.psnr(generated[-1], truth[-1])))
      if out_dir and r == 0 and horizon == runnable[-1]:
        _write_rollout(out_dir, np.concatenate([generated, truth], axis=1))
        cols = _picks(len(generated), 12)
        held = np.asarray(actions[context - 1:context - 1 + len(generated)])  # the action into each frame
        strip = write_strip(out_dir, "rollout", truth[cols], generated[cols],
                            [f"{i + 1}:{ACTION_NAMES[int(held[i])]}" for i in cols])
    result[str(horizon)] = float(np.mean(psnrs))
  return result, strip


def _write_rollout(out_dir: str, frames_thwc: np.ndarray) -> None:
  """rollout.gif, rollout.mp4 (when imageio-ffmpeg is installed) and a TensorBoard video (or image strip)."""
  from tensorboardX import SummaryWriter
  video.write_gif(os.path.join(out_dir, "rollout.gif"), frames_thwc)
  try:
    video.write_mp4(os.path.join(out_dir, "rollout.mp4"), frames_thwc)
  except ImportError as e:
    logging.info("no rollout.mp4: %s", e)
  with SummaryWriter(os.path.join(out_dir, "tensorboard")) as writer:
    video.add_video_summary(writer, "rollout/generated_above_recorded", frames_thwc, 0)


def run(config, workdir: str) -> dict:
  e = config.eval
  settings = world_model.SampleSettings(steps=e.steps, guidance=e.guidance, noise_level=e.noise_level)
  model, run_config = world_model.load(config.diffusion_workdir, settings)
  windows = held_out_windows(run_config, model.context)
  if not len(windows):
    raise ConfigError("diffusion_workdir", "its held-out episodes hold no window", "record longer episodes")
  key = jax.random.key(config.seed)
  steps_list = sorted({e.steps, *e.ddim_steps})
  tf = teacher_forced(model, windows, _picks(len(windows), e.num_windows), batch_size=e.batch_size,
                      steps_list=steps_list, key=key, strip_steps=e.steps)
  os.makedirs(workdir, exist_ok=True)
  strips = {"teacher_forced": write_strip(workdir, "teacher_forced", *tf.pop("strip"))}
  result = {"psnr_teacher_forced": tf["psnr_by_ddim_steps"][str(e.steps)],
            "ssim_teacher_forced": tf["ssim_by_ddim_steps"][str(e.steps)], **tf,
            "num_windows": int(len(_picks(len(windows), e.num_windows))), "ddim_steps": e.steps,
            "guidance": e.guidance, "noise_augmentation": run_config["diffusion"]["noise_augmentation"],
            "context_frames": model.context, "diffusion_workdir": os.path.abspath(config.diffusion_workdir)}
  if e.horizons:
    result["psnr_autoregressive"], rollout_strip = autoregressive(model, run_config, e.horizons, e.num_rollouts,
                                                                  jax.random.fold_in(key, 1), workdir)
    if rollout_strip:
      strips["rollout"] = rollout_strip
  result["strips"] = strips
  logging.info("teacher-forced PSNR %.2f dB (copy-last-frame %.2f, autoencoder %.2f), SSIM %.3f; by steps %s; "
               "autoregressive %s", result["psnr_teacher_forced"], result["psnr_copy_last_frame"],
               result["psnr_autoencoder"], result["ssim_teacher_forced"], tf["psnr_by_ddim_steps"],
               result.get("psnr_autoregressive"))
  logging.info("frames to look at (recorded above generated): %s", ", ".join(strips.values()))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result
