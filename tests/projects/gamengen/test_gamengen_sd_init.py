"""SD-v1.4 initialisation end to end (arXiv 2408.14837, sec. 3.2): a pretrained autoencoder whose decoder alone
is fine-tuned, and a pretrained 4-channel UNet enlarged into the action-conditioned denoiser, both read from
checkpoints the test writes in diffusers' layout, through main.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.models.autoencoder import Autoencoder, AutoencoderConfig
from lwjax.models.diffusers_import import CONFIG_FILE, WEIGHTS_FILE, save_autoencoder, save_unet
from lwjax.models.unet_diffusion import UNet, UNetConfig
from lwjax.projects.gamengen.env import EnvConfig
from lwjax.projects.gamengen.record import ScriptedPolicy, record
from lwjax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
from experiments import gamengen_autoencoder, gamengen_diffusion  # noqa: E402


def _main(experiment, arg, workdir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                         os.path.join(ROOT, "experiments", experiment) + f":{arg}", "--workdir", str(workdir),
                         *overrides], env=env, capture_output=True, text=True, timeout=900)


def _pretrained_unet(path, cfg: UNetConfig) -> np.ndarray:
  """Writes an SD-style UNet (4 input channels, no class or action tensors) to `path`; returns its conv_in."""
  save_unet(UNet(cfg, rngs=nnx.Rngs(jax.random.key(7, impl="rbg"))), path)
  config = json.loads((path / CONFIG_FILE).read_text())
  config.update(in_channels=cfg.latent_channels, num_class_embeds=None)
  del config["lwjax"]
  (path / CONFIG_FILE).write_text(json.dumps(config))
  tensors = load_file(str(path / WEIGHTS_FILE))
  for key in ("class_embedding.weight", "action_embedding.weight", "action_position_embedding.weight"):
    del tensors[key]
  tensors["conv_in.weight"] = np.ascontiguousarray(tensors["conv_in.weight"][:, :cfg.latent_channels])
  save_file(tensors, str(path / WEIGHTS_FILE))
  return tensors["conv_in.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO


@pytest.mark.slow
def test_pretrained_autoencoder_and_unet_start_the_smoke_training(tmp_path):
  recording = str(tmp_path / "rec")
  record(EnvConfig(max_episode_tics=60, seed=3), ScriptedPolicy([1, 1, 9, 10, 5, 11, 6, 3]), 240, recording,
         num_envs=2)  # as the smoke demo records
  ae_config = gamengen_autoencoder.get_config(f"scale=smoke,data={recording}")
  ae_cfg = AutoencoderConfig.from_dict(ae_config.model)
  vae = Autoencoder(ae_cfg, rngs=nnx.Rngs(jax.random.key(5, impl="rbg")))
  save_autoencoder(vae, tmp_path / "vae")
  result = _main("gamengen_autoencoder.py", f"scale=smoke,data={recording}", tmp_path / "ae",
                 f"--config.init.autoencoder={tmp_path / 'vae'}")
  assert result.returncode == 0, result.stderr[-4000:]
  metrics = json.loads((tmp_path / "ae" / "metrics.json").read_text())
  assert set(metrics) == {"pretrained", "decoder", "final_stage"} and metrics["final_stage"] == "decoder"
  assert not (tmp_path / "ae" / "checkpoints").exists()  # no from-scratch stage
  tuned, _, _ = checkpoint.load_model(str(tmp_path / "ae" / "decoder" / "checkpoints"),
                                      lambda c: Autoencoder(AutoencoderConfig.from_dict(c["model"]),
                                                            rngs=nnx.Rngs(0)))
  before, after = nnx.to_pure_dict(nnx.state(vae)), nnx.to_pure_dict(nnx.state(tuned))
  for a, b in zip(jax.tree.leaves(before["encoder"]), jax.tree.leaves(after["encoder"]), strict=True):
    np.testing.assert_array_equal(a, b)  # the pretrained encoder is kept
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(jax.tree.leaves(before["decoder"]), jax.tree.leaves(after["decoder"]), strict=True))

  diff_config = gamengen_diffusion.get_config(f"scale=smoke,data={recording},autoencoder={tmp_path / 'ae'}")
  cfg = UNetConfig.from_dict(diff_config.model)
  sd_conv_in = _pretrained_unet(tmp_path / "unet", cfg)
  result = _main("gamengen_diffusion.py", f"scale=smoke,data={recording},autoencoder={tmp_path / 'ae'}",
                 tmp_path / "diffusion", f"--config.init.unet={tmp_path / 'unet'}")
  assert result.returncode == 0, result.stderr[-4000:]
  assert "starting from the pretrained UNet" in result.stderr
  unet, _, step = checkpoint.load_model(str(tmp_path / "diffusion" / "checkpoints"),
                                        lambda c: UNet(UNetConfig.from_dict(c["model"]), rngs=nnx.Rngs(0)))
  kernel = np.asarray(unet.conv_in.kernel[...])
  c, lr = cfg.latent_channels, diff_config.optim.learning_rate
  # A few Adam steps move each weight by at most ~lr per step: the noisy-latent channels are still SD's, the
  # context channels still near their zero start (a fresh init's are ~100x larger).
  budget = 2 * lr * step
  assert np.abs(kernel[:, :, :c] - sd_conv_in).max() <= budget
  assert np.abs(kernel[:, :, c:]).max() <= budget
  fresh = np.asarray(UNet(cfg, rngs=nnx.Rngs(0)).conv_in.kernel[...])
  assert np.abs(fresh[:, :, c:]).max() > 10 * budget


@pytest.mark.parametrize("module,arg,key,match", [
    (gamengen_diffusion, "data=x,autoencoder=y", "init.unet", "^init.unet: '/nonexistent' has no config.json"),
    (gamengen_autoencoder, "data=x", "init.autoencoder", "^init.autoencoder: '/nonexistent' has no config.json"),
])
def test_a_missing_pretrained_directory_is_a_config_error(module, arg, key, match):
  config = module.get_config(arg)
  config.init[key.split(".")[1]] = "/nonexistent"
  with pytest.raises(ConfigError, match=match):
    jobs.get(config)


def test_a_pretrained_unet_of_another_shape_is_a_config_error(tmp_path):
  config = gamengen_diffusion.get_config("scale=smoke,data=x,autoencoder=y")
  other = UNetConfig.from_dict({**config.model.to_dict(), "block_out_channels": (16, 16)})
  save_unet(UNet(other, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))), tmp_path)
  config.init.unet = str(tmp_path)
  with pytest.raises(ConfigError, match="^init.unet: .*block_out_channels"):
    jobs.get(config)
