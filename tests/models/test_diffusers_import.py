"""diffusers SD-v1.4 VAE/UNet checkpoints: exact key names, round trips, SD-UNet widening, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import configs.autoencoder
import configs.unet
from lwjax.models import diffusers_import
from lwjax.models.autoencoder import Autoencoder, AutoencoderConfig
from lwjax.models.diffusers_import import (
  CONFIG_FILE,
  WEIGHTS_FILE,
  load_autoencoder,
  load_unet,
  save_autoencoder,
  save_unet,
)
from lwjax.models.unet_diffusion import UNet, UNetConfig


def _rngs():
  # Threefry's CPU compile costs about a second per parameter shape; the rbg generator keeps init quick.
  return nnx.Rngs(jax.random.key(0, impl="rbg"))


@nnx.jit
def _unet_forward(model, x, t, bucket, actions):
  return model(x, t, bucket, actions)


@nnx.jit
def _ae_forward(model, x):
  mean, logvar = model.encode(x)
  return mean, logvar, model.decode(mean)


def _unet_inputs(cfg):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, cfg.in_channels))
  actions = jax.random.randint(jax.random.key(1), (2, cfg.context_frames), 0, cfg.num_actions)
  return x, jnp.array([3, 900]), jnp.array([1, 8]), actions


@pytest.fixture(scope="module")
def tiny_unet():
  return UNet(UNetConfig.from_dict(configs.unet.get("unet_tiny")), rngs=_rngs())


def test_sd14_key_names_and_torch_shapes():
  cfg = UNetConfig.from_dict(configs.unet.get("sd14"))
  params = nnx.state(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  shapes = {}
  for path, v in nnx.to_flat_state(params):
    shape = v.shape if path[-1] != "kernel" else (v.shape[::-1] if len(v.shape) == 2 else
                                                  (v.shape[3], v.shape[2], v.shape[0], v.shape[1]))
    shapes[diffusers_import.diffusers_key(path)] = shape
  expected = {  # as in CompVis/stable-diffusion-v1-4/unet (conv_in and the extra embeddings: GameNGen's)
      "conv_in.weight": (320, 260, 3, 3), "time_embedding.linear_1.weight": (1280, 320),
      "class_embedding.weight": (10, 1280), "action_embedding.weight": (17, 768),
      "action_position_embedding.weight": (64, 768),
      "down_blocks.0.resnets.0.time_emb_proj.weight": (320, 1280),
      "down_blocks.0.downsamplers.0.conv.weight": (320, 320, 3, 3),
      "down_blocks.1.resnets.0.conv_shortcut.weight": (640, 320, 1, 1),
      "down_blocks.1.attentions.0.proj_in.weight": (640, 640, 1, 1),
      "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 768),
      "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias": (640,),
      "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
      "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
      "down_blocks.3.resnets.1.conv2.weight": (1280, 1280, 3, 3),
      "mid_block.attentions.0.transformer_blocks.0.norm3.weight": (1280,),
      "up_blocks.0.resnets.2.conv1.weight": (1280, 2560, 3, 3),
      "up_blocks.0.upsamplers.0.conv.weight": (1280, 1280, 3, 3),
      "up_blocks.1.resnets.2.conv1.weight": (1280, 1920, 3, 3),
      "up_blocks.3.resnets.0.conv_shortcut.weight": (320, 960, 1, 1),
      "up_blocks.3.attentions.2.proj_out.weight": (320, 320, 1, 1),
      "conv_norm_out.weight": (320,), "conv_out.weight": (4, 320, 3, 3),
  }
  assert {k: shapes.get(k) for k in expected} == expected
  assert not any(k.startswith(("down_blocks.3.attentions", "up_blocks.0.attentions", "up_blocks.3.upsamplers",
                               "down_blocks.3.downsamplers")) for k in shapes)


def test_unet_round_trip(tmp_path, tiny_unet):
  save_unet(tiny_unet, tmp_path)
  config = json.loads((tmp_path / CONFIG_FILE).read_text())
  assert config["in_channels"] == tiny_unet.cfg.in_channels and config["num_class_embeds"] == 10
  loaded = load_unet(tmp_path, tiny_unet.cfg)
  inputs = _unet_inputs(tiny_unet.cfg)
  np.testing.assert_array_equal(_unet_forward(loaded, *inputs), _unet_forward(tiny_unet, *inputs))


def test_sd_unet_import_widens_conv_in_and_zeroes_the_new_conditioning(tmp_path, tiny_unet):
  save_unet(tiny_unet, tmp_path)
  # Make it look like SD's own UNet: 4 input channels, no class embedding, no action tensors.
  config = json.loads((tmp_path / CONFIG_FILE).read_text())
  config.update(in_channels=4, num_class_embeds=None)
  del config["lwjax"]
  (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
  tensors = load_file(str(tmp_path / WEIGHTS_FILE))
  for key in ("class_embedding.weight", "action_embedding.weight", "action_position_embedding.weight"):
    del tensors[key]
  tensors["conv_in.weight"] = np.ascontiguousarray(tensors["conv_in.weight"][:, :4])
  save_file(tensors, str(tmp_path / WEIGHTS_FILE))

  loaded = load_unet(tmp_path, tiny_unet.cfg, seed=3)
  kernel = np.asarray(loaded.conv_in.kernel[...])
  np.testing.assert_array_equal(kernel[:, :, :4], np.asarray(tiny_unet.conv_in.kernel[...])[:, :, :4])
  assert not kernel[:, :, 4:].any() and not np.asarray(loaded.noise_bucket_embedding.embedding[...]).any()
  assert np.asarray(loaded.action_embedding.embedding[...]).std() > 0.1
  x, t, bucket, actions = _unet_inputs(tiny_unet.cfg)
  base = _unet_forward(loaded, x, t, bucket, actions)
  # As SD on the noisy latent: context frames and noise bucket have no effect yet; actions do.
  np.testing.assert_array_equal(_unet_forward(loaded, x.at[..., 4:].add(1.0), t, bucket + 1, actions), base)
  assert np.abs(np.asarray(_unet_forward(loaded, x, t, bucket, (actions + 1) % 17) - base)).max() > 1e-5


def test_unet_config_mismatches_raise(tmp_path, tiny_unet):
  save_unet(tiny_unet, tmp_path)
  config = json.loads((tmp_path / CONFIG_FILE).read_text())
  for key, value, match in (("block_out_channels", [16, 64], "block_out_channels"),
                            ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
                            ("in_channels", 8, "in_channels")):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=match):
      load_unet(tmp_path, tiny_unet.cfg)


def test_autoencoder_round_trip(tmp_path):
  model = Autoencoder(AutoencoderConfig.from_dict(configs.autoencoder.get("ae_tiny")), rngs=_rngs())
  save_autoencoder(model, tmp_path)
  loaded = load_autoencoder(tmp_path)
  assert loaded.cfg == model.cfg
  x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1.0, maxval=1.0)
  for got, want in zip(_ae_forward(loaded, x), _ae_forward(model, x), strict=False):
    np.testing.assert_array_equal(got, want)


def _resnet(prefix, cin, cout):
  t = {f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,), f"{prefix}.conv1.weight": (cout, cin, 3, 3),
       f"{prefix}.conv1.bias": (cout,), f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
       f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)}
  if cin != cout:
    t.update({f"{prefix}.conv_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.conv_shortcut.bias": (cout,)})
  return t


def _mid(prefix, c, legacy):
  names = ("query", "key", "value", "proj_attn") if legacy else ("to_q", "to_k", "to_v", "to_out.0")
  t = {**_resnet(f"{prefix}.resnets.0", c, c), **_resnet(f"{prefix}.resnets.1", c, c),
       f"{prefix}.attentions.0.group_norm.weight": (c,), f"{prefix}.attentions.0.group_norm.bias": (c,)}
  for name in names:
    t.update({f"{prefix}.attentions.0.{name}.weight": (c, c), f"{prefix}.attentions.0.{name}.bias": (c,)})
  return t


def _vae_state_dict(legacy=False):
  """An `AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4)`."""
  shapes = {
      "encoder.conv_in.weight": (8, 3, 3, 3), "encoder.conv_in.bias": (8,),
      **_resnet("encoder.down_blocks.0.resnets.0", 8, 8),
      "encoder.down_blocks.0.downsamplers.0.conv.weight": (8, 8, 3, 3),
      "encoder.down_blocks.0.downsamplers.0.conv.bias": (8,),
      **_resnet("encoder.down_blocks.1.resnets.0", 8, 16), **_mid("encoder.mid_block", 16, legacy),
      "encoder.conv_norm_out.weight": (16,), "encoder.conv_norm_out.bias": (16,),
      "encoder.conv_out.weight": (4, 16, 3, 3), "encoder.conv_out.bias": (4,),
      "quant_conv.weight": (4, 4, 1, 1), "quant_conv.bias": (4,),
      "post_quant_conv.weight": (2, 2, 1, 1), "post_quant_conv.bias": (2,),
      "decoder.conv_in.weight": (16, 2, 3, 3), "decoder.conv_in.bias": (16,), **_mid("decoder.mid_block", 16, legacy),
      **_resnet("decoder.up_blocks.0.resnets.0", 16, 16), **_resnet("decoder.up_blocks.0.resnets.1", 16, 16),
      "decoder.up_blocks.0.upsamplers.0.conv.weight": (16, 16, 3, 3),
      "decoder.up_blocks.0.upsamplers.0.conv.bias": (16,),
      **_resnet("decoder.up_blocks.1.resnets.0", 16, 8), **_resnet("decoder.up_blocks.1.resnets.1", 8, 8),
      "decoder.conv_norm_out.weight": (8,), "decoder.conv_norm_out.bias": (8,),
      "decoder.conv_out.weight": (3, 8, 3, 3), "decoder.conv_out.bias": (3,),
  }
  rng = np.random.default_rng(0)
  return {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in sorted(shapes.items())}


def _write_vae(path, tensors):
  path.mkdir(exist_ok=True)
  config = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "layers_per_block": 1,
            "latent_channels": 2, "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "in_channels": 3, "out_channels": 3, "scaling_factor": 0.5}
  (path / CONFIG_FILE).write_text(json.dumps(config))
  save_file(tensors, str(path / WEIGHTS_FILE))


def test_hand_written_diffusers_vae_loads_and_round_trips(tmp_path):
  tensors = _vae_state_dict()
  _write_vae(tmp_path / "new", tensors)
  model = load_autoencoder(tmp_path / "new")
  assert (model.cfg.block_out_channels, model.cfg.norm_groups, model.cfg.scaling_factor) == ((8, 16), 4, 0.5)
  np.testing.assert_array_equal(model.encoder.conv_in.kernel[...],
                                tensors["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.encoder.mid_block.attentions[0].to_q.kernel[...],
                                tensors["encoder.mid_block.attentions.0.to_q.weight"].T)
  x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3), minval=-1.0, maxval=1.0)
  outputs = _ae_forward(model, x)
  assert outputs[0].shape == (1, 4, 4, 2) and outputs[2].shape == x.shape

  legacy = {k.replace("query", "to_q").replace("key", "to_k").replace("value", "to_v")
            .replace("proj_attn", "to_out.0"): v for k, v in _vae_state_dict(legacy=True).items()}
  assert legacy.keys() == tensors.keys()  # the same tensors under the old attention names
  _write_vae(tmp_path / "legacy", _vae_state_dict(legacy=True))
  for got, want in zip(_ae_forward(load_autoencoder(tmp_path / "legacy"), x), outputs, strict=False):
    np.testing.assert_array_equal(got, want)

  save_autoencoder(model, tmp_path / "saved")
  saved = load_file(str(tmp_path / "saved" / WEIGHTS_FILE))
  assert saved.keys() == tensors.keys()
  for key, value in tensors.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_bad_vae_checkpoints_raise(tmp_path):
  tensors = _vae_state_dict()
  _write_vae(tmp_path, {k: v for k, v in tensors.items() if k != "decoder.up_blocks.1.resnets.1.conv2.weight"})
  with pytest.raises(ValueError, match=r"missing 1 tensor.*decoder\.up_blocks\.1\.resnets\.1\.conv2\.weight"):
    load_autoencoder(tmp_path)
  _write_vae(tmp_path, {**tensors, "encoder.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected.*encoder\.extra\.weight"):
    load_autoencoder(tmp_path)
  _write_vae(tmp_path, {**tensors, "quant_conv.bias": np.zeros(5, np.float32)})
  with pytest.raises(ValueError, match=r"quant_conv\.bias has shape"):
    load_autoencoder(tmp_path)
  _write_vae(tmp_path, tensors)
  with pytest.raises(ValueError, match="norm_groups"):
    load_autoencoder(tmp_path, AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2,
                                                 norm_groups=8))


def test_matches_diffusers(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2).eval()
  vae.save_pretrained(tmp_path / "vae")
  ours = load_autoencoder(tmp_path / "vae")
  x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mean_ref = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mean
    image_ref = vae.decode(mean_ref).sample.numpy().transpose(0, 2, 3, 1)
  mean, _, image = _ae_forward(ours, jnp.asarray(x))
  np.testing.assert_allclose(mean, mean_ref.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(image, image_ref, atol=1e-4, rtol=1e-4)
  assert np.abs(image_ref).max() > 0.1

  cfg = UNetConfig(context_frames=2, block_out_channels=(16, 32), attention_levels=(True, False), layers_per_block=1,
                   num_heads=2, cross_attention_dim=16, norm_groups=8)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=cfg.in_channels, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8, num_class_embeds=10).eval()
  unet.save_pretrained(tmp_path / "unet")
  ours = load_unet(tmp_path / "unet", cfg)
  x, t, bucket, actions = _unet_inputs(cfg)
  tokens = np.array(ours.action_tokens(actions))
  with torch.no_grad():
    ref = unet(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)), torch.from_numpy(np.array(t)),
               encoder_hidden_states=torch.from_numpy(tokens),
               class_labels=torch.from_numpy(np.array(bucket))).sample.numpy().transpose(0, 2, 3, 1)
  assert np.abs(ref).max() > 0.1  # a real signal, not two zero outputs
  np.testing.assert_allclose(_unet_forward(ours, x, t, bucket, actions), ref, atol=1e-4, rtol=1e-4)
