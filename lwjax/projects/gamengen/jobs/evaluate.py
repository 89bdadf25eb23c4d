"""The `gamengen_eval` job: next-frame quality of a trained world model on held-out episodes (arXiv 2408.14837,
sec. 5.1-5.2).

Held-out episodes: those of the diffusion run's recordings it held out (`data.held_out_episodes`), or, with
`eval.recordings`, every episode of another gamengen_record run of the same game (frame shape, action set and
tics per action checked; the first `eval.episodes` of them when > 0), none of which the model saw. Windows are
`data.frame_stride` records apart as in training and are shared evenly between the episodes.
On `eval.num_windows` windows of them:
- teacher-forced: the next frame from the true context (recorded frames, encoded) under the recorded
  action; PSNR and SSIM to the recorded frame at model resolution, next to two baselines measured on the
  same windows: copying the last context frame, and the autoencoder's reconstruction of the target
  (the ceiling: the denoiser can at best produce that latent);
- DDIM steps: teacher-forced PSNR for each of `eval.ddim_steps` (the paper's 1/2/4/8 ablation);
- autoregressive: from the first `context` frames of a held-out stretch, the model feeds on its own frames
  under the recorded actions; PSNR of frame n for each n in `eval.horizons` (16/32/64 as episodes allow).
Writes `<workdir>/metrics.json` (`psnr_teacher_forced`, `psnr_copy_last_frame`, `psnr_autoencoder`,
`ssim_teacher_forced`, ...) with `paired_vs_copy_last_frame`: the model minus copy-last-frame, PSNR and SSIM,
window by window, its mean and a 95% bootstrap interval that resamples episodes, then windows within them
(windows alone when there is one episode; `metrics.paired_bootstrap`, 2,000 resamples seeded by `seed`);
`<workdir>/per_window.jsonl.gz`, one row per teacher-forced window (recording, episode, start step, action, and
PSNR/SSIM of the model at each DDIM step count, of copy-last-frame and of the autoencoder); PNG strips of
recorded frames above generated ones with the action under each column, `teacher_forced.png` (one held-out
window per column) and `rollout.png` (the first autoregressive rollout, evenly spaced frames), also in
TensorBoard; and that rollout above the recorded frames as `<workdir>/rollout.gif`, `rollout.mp4` (with
imageio-ffmpeg) and a TensorBoard video (image strip without moviepy) under `<workdir>/tensorboard`. LPIPS and
FVD need pretrained networks that cannot be fetched here: not reported.
"""

from __future__ import annotations

import gzip
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
from lwjax.projects.gamengen.record import INDEX_FILE, EpisodeWindows, WindowSource, split_episodes
from lwjax.training import checkpoint

BOOTSTRAP_RESAMPLES = 2000

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
        "recordings": Field(str, has_default=True, doc="a gamengen_record run (its workdir or trajectories/) of "
                            "the training game whose episodes are all held out; empty: the run's held-out split"),
        "episodes": Field(int, min=0, has_default=True, doc="evaluate the first this many episodes of "
                          "eval.recordings; 0 = all"),
    },
}


def validate(config) -> None:
  validate_settings(config)
  if not os.path.isdir(os.path.join(config.diffusion_workdir, "checkpoints")):
    raise ConfigError("diffusion_workdir", f"{config.diffusion_workdir!r} holds no checkpoints/",
                      "the workdir of a gamengen_diffusion run")
  if config.eval.get("recordings"):
    check_recordings(config.eval.recordings, checkpoint.load_config(os.path.join(config.diffusion_workdir,
                                                                                  "checkpoints")))


def validate_settings(config) -> None:
  """Everything but the run to evaluate (which a pipeline makes first)."""
  validate_schema(config, SCHEMA)
  for key in ("ddim_steps", "horizons"):
    if not all(isinstance(v, int) and v > 0 for v in config.eval[key]):
      raise ConfigError(f"eval.{key}", f"{list(config.eval[key])!r} holds a value that is not a positive int",
                        "a list of positive ints")


def recordings_dir(path: str) -> str:
  """The folder of `index.json`: `path`, or the `trajectories/` of a gamengen_record workdir."""
  if not os.path.exists(os.path.join(path, INDEX_FILE)) and os.path.exists(
      os.path.join(path, "trajectories", INDEX_FILE)):
    return os.path.join(path, "trajectories")
  return path


def _read_index(directory: str) -> dict:
  with open(os.path.join(directory, INDEX_FILE)) as f:
    return json.load(f)


def check_recordings(path: str, run_config: dict) -> None:
  """Raises a ConfigError on `eval.recordings` unless it is a recording, not one the run trained on, of frames
  of the run's shape under its action set and tics per action (windows are the run's stride apart)."""
  directory = recordings_dir(path)
  valid = "the workdir (or trajectories/) of a gamengen_record run of the training game"
  if not os.path.exists(os.path.join(directory, INDEX_FILE)):
    raise ConfigError("eval.recordings", f"{path!r} holds no {INDEX_FILE}", valid)
  trained = [os.path.abspath(d) for d in run_config["data"]["recordings"]]
  if os.path.abspath(directory) in trained:
    raise ConfigError("eval.recordings", f"{path!r} is one of the run's training recordings",
                      "episodes the diffusion run never saw (leave eval.recordings empty for its held-out split)")
  if not os.path.exists(os.path.join(trained[0], INDEX_FILE)):
    logging.warning("eval.recordings: the run's training recordings %s are gone; frame shape and actions not "
                    "checked", trained[0])
    return
  index, train = _read_index(directory), _read_index(trained[0])
  for name, got, want in (("frame shape", index["frame_shape"], train["frame_shape"]),
                          ("action set", index["actions"], train["actions"]),
                          ("tics_per_action", index["env_config"]["tics_per_action"],
                           train["env_config"]["tics_per_action"])):
    if list(np.atleast_1d(got)) != list(np.atleast_1d(want)):
      raise ConfigError("eval.recordings", f"{path!r} has {name} {got!r} where the diffusion run trained on "
                        f"{want!r}", valid)
  differ = sorted(k for k in set(index["env_config"]) | set(train["env_config"])
                  if k != "seed" and index["env_config"].get(k) != train["env_config"].get(k))
  if differ:
    logging.warning("eval.recordings: env settings differ from the training recordings' in %s", ", ".join(differ))


def held_out_windows(run_config: dict, context: int, recordings: str = "", max_episodes: int = 0) -> WindowSource:
  """Windows of `context` frames from every episode of `recordings` (the first `max_episodes` when > 0) or else
  the held-out episodes of a diffusion run (all episodes when none), at the run's frame stride."""
  stride = run_config["data"]["frame_stride"]
  if recordings:
    directory = recordings_dir(recordings)
    n = len(EpisodeWindows(directory, context=0).all_episodes)
    return WindowSource(directory, context, episodes=range(min(n, max_episodes or n)), stride=stride)
  directories = list(run_config["data"]["recordings"])
  n = len(EpisodeWindows(directories, context=0).all_episodes)
  train_eps, eval_eps = split_episodes(n, run_config["data"]["held_out_episodes"])
  return WindowSource(directories, context, episodes=eval_eps or train_eps, stride=stride)


def _picks(num_windows: int, n: int) -> np.ndarray:
  return np.unique(np.linspace(0, num_windows - 1, min(n, num_windows)).astype(int))


def picks_across_episodes(windows: WindowSource, num: int) -> np.ndarray:
  """`num` window numbers (every window when there are fewer), shared as evenly between the episodes as their
  lengths allow (what a short episode cannot hold goes to the others; a remainder smaller than the episodes
  left, to episodes spread over them) and evenly spaced within each."""
  episodes = windows.windows.episode_windows()
  sizes = np.asarray([len(r) for r in episodes], np.int64)
  quota, left = np.zeros_like(sizes), num
  while left and (growable := np.flatnonzero(quota < sizes)).size:
    each = left // len(growable)
    if not each:
      quota[growable[_picks(len(growable), left)]] += 1
      break
    added = np.minimum(each, sizes[growable] - quota[growable])
    quota[growable] += added
    left -= int(added.sum())
  return np.concatenate([r.start + _picks(len(r), q) for r, q in zip(episodes, quota, strict=True) if q] or
                        [np.zeros(0, np.int64)])


def teacher_forced(model: world_model.WorldModel, windows: WindowSource, picks, *, batch_size: int, steps_list,
                   key, strip_steps: int | None = None, strip_columns: int = 8) -> dict:
  """PSNR/SSIM of the next frame from the true context, per DDIM step count, and the two baselines, averaged,
  and per window under "per_window" (arrays [len(picks)]: where each window is and each method's values); with
  `strip_steps`, "strip": (recorded, generated at that step count, the action names) of the first
  `strip_columns` windows."""
  shrink = model.geometry.shrink
  predicted = {s: [] for s in steps_list}
  copy, recon, targets, where = [], [], [], []
  for start in tqdm.tqdm(range(0, len(picks), batch_size), desc="teacher-forced", unit="batch"):
    chunk = [windows[int(j)] for j in picks[start:start + batch_size]]
    chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape; the copies are dropped below
    n = len(picks[start:start + batch_size])
    where += [(windows.windows.locate(int(j))[0], int(w["episode"][0]), int(w["step"][0]), int(w["actions"][-1]))
              for j, w in zip(picks[start:start + batch_size], chunk, strict=False)]
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
  per_window = {key: np.asarray(column) for key, column in zip(("recording", "episode", "start", "action"),
                                                                zip(*where, strict=True), strict=True)}
  for name, frames in (("copy_last_frame", copy), ("autoencoder", recon),
                       *((s, np.concatenate(chunks)) for s, chunks in predicted.items())):
    per_window[f"psnr_{name}"] = np.asarray(metrics_lib.psnr(frames, targets))
    per_window[f"ssim_{name}"] = np.asarray(metrics_lib.ssim(frames, targets))
  result = {f"{m}_{name}": float(per_window[f"{m}_{name}"].mean())
            for m in ("psnr", "ssim") for name in ("copy_last_frame", "autoencoder")}
  for m in ("psnr", "ssim"):
    result[f"{m}_by_ddim_steps"] = {str(s): float(per_window[f"{m}_{s}"].mean()) for s in predicted}
  result["per_window"] = per_window
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
                   out_dir: str | None, recordings: str = "", max_episodes: int = 0) -> tuple[dict, str | None]:
  """PSNR of generated frame n (n in `horizons`) under the recorded actions, from recorded contexts, and the
  path of the first rollout's strip at the longest horizon the held-out episodes hold (when `out_dir` is given);
  held-out episodes as `held_out_windows` picks them."""
  context, result, strip = model.context, {}, None
  stretches_by_horizon = {}
  for horizon in sorted(horizons):
    stretches_by_horizon[horizon] = held_out_windows(run_config, context + horizon - 1, recordings, max_episodes)
    if not len(stretches_by_horizon[horizon]):
      logging.warning("no held-out episode holds %d + %d frames: horizon %d skipped", context, horizon, horizon)
  runnable = [horizon for horizon, stretches in stretches_by_horizon.items() if len(stretches)]
  for horizon in runnable:
    stretches = stretches_by_horizon[horizon]
    psnrs = []
    for r, j in enumerate(picks_across_episodes(stretches, num_rollouts)):
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


def paired_vs_copy_last_frame(per_window: dict, steps: int, seed: int) -> dict:
  """The model at `steps` DDIM steps minus copy-last-frame, PSNR and SSIM: mean and 95% bootstrap interval over
  the windows, episodes resampled as clusters (`metrics.paired_bootstrap`)."""
  _, episode = np.unique(np.stack([per_window["recording"], per_window["episode"]], axis=1), axis=0,
                         return_inverse=True)
  result = {}
  for m in ("psnr", "ssim"):
    diff = per_window[f"{m}_{steps}"].astype(np.float64) - per_window[f"{m}_copy_last_frame"]
    finite = np.isfinite(diff)
    if not finite.all():  # PSNR is inf where a frame equals its target
      logging.warning("%s: %d windows with a non-finite difference left out of the bootstrap", m, (~finite).sum())
    result[m] = metrics_lib.paired_bootstrap(diff[finite], episode.reshape(-1)[finite],
                                             num_resamples=BOOTSTRAP_RESAMPLES, seed=seed)
  return result


def write_per_window(path: str, per_window: dict, steps_list, steps: int) -> None:
  """One JSON row per window: "recording" (its position in metrics.json's `recordings`), "episode" (the id in
  that recording's index.json), "start" (the step of its first context frame), "action" (held into the target)
  and its name, and PSNR/SSIM of the model (`*_model` at `steps`, `*_by_ddim_steps` at each of `steps_list`),
  copy-last-frame and the autoencoder."""
  with gzip.open(path, "wt") as f:
    for i in range(len(per_window["episode"])):
      row = {key: int(per_window[key][i]) for key in ("recording", "episode", "start", "action")}
      row["action_name"] = ACTION_NAMES[row["action"]]
      for m in ("psnr", "ssim"):
        row[f"{m}_model"] = float(per_window[f"{m}_{steps}"][i])
        row[f"{m}_copy_last_frame"] = float(per_window[f"{m}_copy_last_frame"][i])
        row[f"{m}_autoencoder"] = float(per_window[f"{m}_autoencoder"][i])
        row[f"{m}_by_ddim_steps"] = {str(s): float(per_window[f"{m}_{s}"][i]) for s in steps_list}
      f.write(json.dumps(row) + "\n")


def run(config, workdir: str) -> dict:
  e = config.eval
  recordings, max_episodes = e.get("recordings", ""), e.get("episodes", 0)
  settings = world_model.SampleSettings(steps=e.steps, guidance=e.guidance, noise_level=e.noise_level)
  model, run_config = world_model.load(config.diffusion_workdir, settings)
  windows = held_out_windows(run_config, model.context, recordings, max_episodes)
  if not len(windows):
    raise ConfigError("eval.recordings" if recordings else "diffusion_workdir",
                      "its held-out episodes hold no window", "record longer episodes")
  key = jax.random.key(config.seed)
  steps_list = sorted({e.steps, *e.ddim_steps})
  picks = picks_across_episodes(windows, e.num_windows)
  tf = teacher_forced(model, windows, picks, batch_size=e.batch_size, steps_list=steps_list, key=key,
                      strip_steps=e.steps)
  os.makedirs(workdir, exist_ok=True)
  strips = {"teacher_forced": write_strip(workdir, "teacher_forced", *tf.pop("strip"))}
  per_window = tf.pop("per_window")
  paired = paired_vs_copy_last_frame(per_window, e.steps, config.seed)
  result = {"psnr_teacher_forced": tf["psnr_by_ddim_steps"][str(e.steps)],
            "ssim_teacher_forced": tf["ssim_by_ddim_steps"][str(e.steps)], **tf,
            "paired_vs_copy_last_frame": paired, "num_windows": int(len(picks)), "ddim_steps": e.steps,
            "guidance": e.guidance, "noise_augmentation": run_config["diffusion"]["noise_augmentation"],
            "context_frames": model.context, "diffusion_workdir": os.path.abspath(config.diffusion_workdir),
            "recordings": [os.path.abspath(d) for d in windows.windows.directories]}
  if e.horizons:
    result["psnr_autoregressive"], rollout_strip = autoregressive(model, run_config, e.horizons, e.num_rollouts,
                                                                  jax.random.fold_in(key, 1), workdir, recordings,
                                                                  max_episodes)
    if rollout_strip:
      strips["rollout"] = rollout_strip
  result["strips"] = strips
  logging.info("teacher-forced PSNR %.2f dB (copy-last-frame %.2f, autoencoder %.2f), SSIM %.3f (copy-last-frame "
               "%.3f); by steps %s; autoregressive %s", result["psnr_teacher_forced"], result["psnr_copy_last_frame"],
               result["psnr_autoencoder"], result["ssim_teacher_forced"], result["ssim_copy_last_frame"],
               tf["psnr_by_ddim_steps"], result.get("psnr_autoregressive"))
  p, s = paired["psnr"], paired["ssim"]
  logging.info("model minus copy-last-frame: PSNR %+.2f dB, 95%% CI [%+.2f, %+.2f]; SSIM %+.4f, 95%% CI "
               "[%+.4f, %+.4f] (%d windows of %d episodes, %d bootstrap resamples of %s)", p["mean_diff"], *p["ci95"],
               s["mean_diff"], *s["ci95"], p["n_windows"], p["n_episodes"], p["num_resamples"], p["resampled"])
  logging.info("frames to look at (recorded above generated): %s", ", ".join(strips.values()))
  if jax.process_index() == 0:
    write_per_window(os.path.join(workdir, "per_window.jsonl.gz"), per_window, steps_list, e.steps)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result
