"""AttnLRP input relevance for lwjax's GPT (Achtibat et al. 2024, ICML, Sec. 3), as LRP4RAG (arXiv 2408.15533,
Sec. 3) uses it: per prompt token, how much it contributed to each logit of the generated answer.

The "LRP forward" below is the GPT's forward (`lwjax.models.gpt.GPT.__call__`: same parameters, same values)
written with the rule functions of `lwjax.relevance.rules` in place of the ordinary operations:

  linear projections (q, k, v, o, gate, up, down, LM head)  epsilon rule (Eq. 8)
  RMSNorm                                                   identity rule (Prop. 3.4, Eq. 9)
  SiLU                                                      identity rule (Eq. 9)
  silu(gate) * up                                           uniform rule (Prop. 3.2)
  q . k and attention weights . values                      epsilon + uniform rule (Prop. 3.3)
  softmax                                                   Taylor at x with bias (Prop. 3.1)
  RoPE, residual sums, the 1/sqrt(d) scale                  plain gradient (linear: LRP-0 / epsilon rule, eps 0)

One `jax.vjp` of the explained logit then gives relevance = embedding x cotangent, summed over the embedding
dimension. Examples of a batch are independent, so a whole batch is one backward pass; all functions are pure
JAX over the module's parameters (jit them with `nnx.jit`, or call them on `nnx.merge(graphdef, state)` inside
`jax.jit`), and sharded parameters stay sharded (activations are constrained by the same logical names).
What is conserved, and what is not: see `conservation_report`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lwjax.kernels.reference import _MASK_VALUE
from lwjax.models import gpt
from lwjax.models.logical import constrain
from lwjax.relevance import rules

DEFAULT_EPSILON = rules.DEFAULT_EPSILON
# GPTConfig fields the LRP forward implements; `remat` and `attention_impl` change how the model computes, not
# what: the LRP forward runs its own einsum attention. A field added to GPTConfig later (a sliding window,
# experts, ...) is refused unless it keeps its default.
SUPPORTED_CONFIG = frozenset({
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
    "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "dtype", "param_dtype", "remat",
    "attention_impl"})
_EMBED = ("batch", "length", "embed")


def unsupported(cfg: gpt.GPTConfig) -> str | None:
  """The first option of `cfg` the LRP forward does not implement (`GPTConfig.<field>=<value>`), or None: a
  config check before any weight is loaded (Llama's options pass; Gemma-2's soft-caps, Qwen2's biases and a
  sliding window do not)."""
  for field in dataclasses.fields(cfg):
    if field.name in SUPPORTED_CONFIG:
      continue
    value = getattr(cfg, field.name)
    if field.default is dataclasses.MISSING or value != field.default:
      return f"GPTConfig.{field.name}={value!r}"
  return None


def check_supported(model) -> gpt.GPTConfig:
  """The model's config, after checking that the LRP forward implements everything it uses (ValueError if not)."""
  if not isinstance(model, gpt.GPT):
    raise ValueError(f"AttnLRP is implemented for lwjax.models.gpt.GPT, got {type(model).__name__}")
  if (option := unsupported(model.cfg)) is not None:
    raise ValueError(f"AttnLRP does not support {option}; supported options: {sorted(SUPPORTED_CONFIG)}")
  return model.cfg


def _weights(model, cfg) -> dict:
  """The parameters the LRP forward reads, as arrays in the compute dtype."""
  dt = cfg.dtype

  def read(module, name):
    if not hasattr(module, name):
      raise ValueError(f"AttnLRP expects {type(module).__name__}.{name} (the dense GPT block); not found")
    return getattr(module, name)[...]

  layers = [{
      "attn_norm": read(block.attn_norm, "scale"), "mlp_norm": read(block.mlp_norm, "scale"),
      **{n: read(block.attn, n).astype(dt) for n in ("wq", "wk", "wv", "wo")},
      **{n: read(block.mlp, n).astype(dt) for n in ("w_gate", "w_up", "w_down")},
  } for block in model.layers]
  embed = model.embed[...]
  head = embed.T if cfg.tie_embeddings else model.lm_head[...]
  return {"embed": embed, "layers": layers, "final_norm": model.final_norm.scale[...], "head": head.astype(dt)}


def _tap(acts, probes, name, value):
  """Records an activation; adds its probe (zeros) so that the cotangent there can be read back."""
  if probes is not None and name in probes:
    value = value + probes[name][len(acts[name])]
  acts[name].append(value)
  return value


def _attention(lw, cfg, x_btd, positions_bt, inv_freq, epsilon, acts, probes):
  """Causal GQA self-attention (`kernels.reference.attention` math) with the AttnLRP rules."""
  q = gpt.apply_rope(rules.epsilon_dense(x_btd, lw["wq"], epsilon=epsilon), positions_bt, inv_freq)
  k = gpt.apply_rope(rules.epsilon_dense(x_btd, lw["wk"], epsilon=epsilon), positions_bt, inv_freq)
  v = rules.epsilon_dense(x_btd, lw["wv"], epsilon=epsilon)
  q = constrain(q, ("batch", "length", "heads", "head_dim"))
  k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
  v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
  b, t, heads, hd = q.shape
  kv_heads = k.shape[2]
  q_btkgd = q.reshape(b, t, kv_heads, heads // kv_heads, hd)
  scores = rules.uniform_einsum("bqkgd,bskd->bkgqs", q_btkgd, k, epsilon=epsilon) * hd ** -0.5
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = _tap(acts, probes, "scores", jnp.where(causal, scores, _MASK_VALUE))  # [b, kv_heads, groups, q, s]
  probs = _tap(acts, probes, "probs", rules.softmax_rule(scores))
  out = rules.uniform_einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, epsilon=epsilon)
  out = constrain(out.reshape(b, t, heads, hd).astype(q.dtype), ("batch", "length", "heads", "head_dim"))
  return rules.epsilon_dense(out, lw["wo"], epsilon=epsilon, in_dims=2)


def _mlp(lw, x_btd, epsilon):
  """SwiGLU: identity rule through SiLU, uniform rule on gate x up, epsilon rule on the projections."""
  gate = rules.elementwise_identity(jax.nn.silu, rules.epsilon_dense(x_btd, lw["w_gate"], epsilon=epsilon))
  h = rules.uniform_product(gate, rules.epsilon_dense(x_btd, lw["w_up"], epsilon=epsilon))
  return rules.epsilon_dense(constrain(h, ("batch", "length", "mlp")), lw["w_down"], epsilon=epsilon)


def _hidden(w, cfg, x_btd, positions_bt, epsilon, probes=None):
  """Embeddings -> final-normed hidden [b, t, d] and the activations recorded at the probe points:
  "residual" (L + 1 of [b, t, d]: each block's input, then the last block's output), "scores" and "probs"
  (L of [b, kv_heads, groups, q, s]: softmax inputs after masking, and outputs)."""
  inv_freq = gpt.rope_frequencies(cfg)
  acts = {"residual": [], "scores": [], "probs": []}
  x = _tap(acts, probes, "residual", constrain(x_btd, _EMBED))
  for lw in w["layers"]:
    h = _attention(lw, cfg, rules.rms_norm_identity(x, lw["attn_norm"], cfg.norm_eps), positions_bt, inv_freq,
                   epsilon, acts, probes)
    x = constrain(x + h, _EMBED)
    x = constrain(x + _mlp(lw, rules.rms_norm_identity(x, lw["mlp_norm"], cfg.norm_eps), epsilon), _EMBED)
    x = _tap(acts, probes, "residual", x)
  return rules.rms_norm_identity(x, w["final_norm"], cfg.norm_eps), acts


def _prepare(model, tokens_bt):
  cfg = check_supported(model)
  w = _weights(model, cfg)
  positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  x_btd = jnp.take(w["embed"], tokens_bt, axis=0).astype(cfg.dtype)
  return cfg, w, positions, x_btd


def _targets(tokens_bt, target_position, target_token):
  batch = tokens_bt.shape[0]
  pos = jnp.broadcast_to(jnp.asarray(target_position, jnp.int32), (batch,))
  tok = jnp.broadcast_to(jnp.asarray(target_token, jnp.int32), (batch,))
  return pos, tok


def _target_logit(head, h_btd, pos_b, tok_b, epsilon):
  """logits[b, pos_b, tok_b] [b] (float32) through the LM head's epsilon rule."""
  h_bd = jnp.take_along_axis(h_btd, pos_b[:, None, None], axis=1)[:, 0]
  logits_bv = rules.epsilon_dense(h_bd, head, epsilon=epsilon).astype(jnp.float32)
  return jnp.take_along_axis(logits_bv, tok_b[:, None], axis=1)[:, 0]


def _per_token(value, cotangent):
  """Relevance value x cotangent summed over the last (feature) axis."""
  return jnp.sum(value.astype(jnp.float32) * cotangent.astype(jnp.float32), axis=-1)


def lrp_forward(model, tokens_bt, *, epsilon: float = DEFAULT_EPSILON):
  """The LRP forward: (logits [b, t, vocab] float32, equal to `model(tokens_bt)`, and the recorded activations
  of `_hidden`: "residual", "scores", "probs")."""
  cfg, w, positions, x_btd = _prepare(model, tokens_bt)
  h, acts = _hidden(w, cfg, x_btd, positions, epsilon)
  logits = rules.epsilon_dense(h, w["head"], epsilon=epsilon).astype(jnp.float32)
  return constrain(logits, ("batch", "length", "vocab")), acts


def _explain(model, tokens_bt, target_position, target_token, epsilon, probe_names):
  """One backward pass: (explained logit [b], input relevance [b, t], activations, cotangents at the probes)."""
  cfg, w, positions, x_btd = _prepare(model, tokens_bt)
  pos, tok = _targets(tokens_bt, target_position, target_token)
  probes = {}
  if probe_names:
    shapes = jax.eval_shape(lambda x: _hidden(w, cfg, x, positions, epsilon)[1], x_btd)
    probes = {name: [jnp.zeros(s.shape, s.dtype) for s in shapes[name]] for name in probe_names}

  def explained(x, probes):
    h, acts = _hidden(w, cfg, x, positions, epsilon, probes)
    return _target_logit(w["head"], h, pos, tok, epsilon), acts

  logit, vjp, acts = jax.vjp(explained, x_btd, probes, has_aux=True)
  g_x, g_probes = vjp(jnp.ones_like(logit))
  return logit, _per_token(x_btd, g_x), acts, g_probes


def relevance(model, tokens_bt, target_position, target_token, *, epsilon: float = DEFAULT_EPSILON):
  """AttnLRP relevance of each input token for logits[b, target_position, target_token]: [b, t] float32.

  target_position, target_token: ints or int arrays [b]. The relevances of a row sum to that logit minus what
  the softmax rule's bias terms and the epsilon stabilisers absorb (`conservation_report`). Tokens after the
  target position get exactly 0 (causal attention). `epsilon` is the epsilon rule's stabiliser (Python float).
  """
  return _explain(model, tokens_bt, target_position, target_token, epsilon, ())[1]


def layer_relevance(model, tokens_bt, target_position, target_token, *, epsilon: float = DEFAULT_EPSILON):
  """Per-token relevance on the residual stream before each block and after the last: [b, n_layers + 1, t].

  Index 0 is the input relevance (`relevance`); index l + 1 is block l's output. Summing over t gives the
  relevance that crosses each layer boundary, for checking conservation layer by layer.
  """
  _, _, acts, g = _explain(model, tokens_bt, target_position, target_token, epsilon, ("residual",))
  return jnp.stack([_per_token(a, c) for a, c in zip(acts["residual"], g["residual"], strict=False)], axis=1)


def answer_relevance(model, tokens_bt, prompt_len: int, *, epsilon: float = DEFAULT_EPSILON,
                     batch_size: int | None = None):
  """LRP4RAG's relevance matrix: [b, answer tokens, prompt tokens] (answer = tokens_bt[:, prompt_len:]).

  Row j explains the logit that produced answer token j (position prompt_len + j - 1, token
  tokens_bt[:, prompt_len + j]) and keeps its relevance on the prompt positions. The forward runs once; the
  backward passes, one per answer token, run vmapped (all at once) or, with `batch_size`, `batch_size` at a
  time (`jax.lax.map`), which bounds the memory of long answers. `prompt_len` is a Python int (static under jit).
  Rows of different lengths in one padded shape: `padded_answer_relevance`.
  """
  batch, length = tokens_bt.shape
  if not 0 < prompt_len < length:
    raise ValueError(f"prompt_len must be in (0, {length}) for sequences of {length} tokens, got {prompt_len}")
  answer = length - prompt_len
  matrix = padded_answer_relevance(model, tokens_bt, prompt_len, answer, answer, epsilon=epsilon,
                                   batch_size=batch_size)
  return matrix[:, :, :prompt_len]


def padded_answer_relevance(model, tokens_bt, prompt_len_b, answer_len_b, answer_rows: int, *,
                            epsilon: float = DEFAULT_EPSILON, batch_size: int | None = None):
  """`answer_relevance` of right-padded rows of different lengths: [b, answer_rows, t] float32.

  Row b of tokens_bt [b, t] holds prompt_len_b[b] prompt tokens, then answer_len_b[b] answer tokens, then
  padding (any token ids). Entry [b, j, i] is what `answer_relevance` of the unpadded row gives for answer token j
  and prompt token i; it is exactly 0 for j >= answer_len_b[b] (rows past the answer) and for i >= prompt_len_b[b]
  (answer and padding columns). The padding needs no mask of its own: it comes after every explained position,
  so the causal mask already hides it from the real tokens, and the real tokens keep their unpadded positions
  (RoPE) 0, 1, ... Only t and `answer_rows` (a Python int >= every answer_len_b, the backward passes per row)
  are static: one compiled program serves any lengths that fit. prompt_len_b, answer_len_b: ints or int arrays
  [b], each prompt_len >= 1. `batch_size` as in `answer_relevance`.
  """
  batch, length = tokens_bt.shape
  prompt_len_b = jnp.broadcast_to(jnp.asarray(prompt_len_b, jnp.int32), (batch,))
  answer_len_b = jnp.broadcast_to(jnp.asarray(answer_len_b, jnp.int32), (batch,))
  cfg, w, positions, x_btd = _prepare(model, tokens_bt)
  h_btd, vjp_hidden = jax.vjp(lambda x: _hidden(w, cfg, x, positions, epsilon)[0], x_btd)

  def one(pos_b, tok_b):
    _, vjp_logit = jax.vjp(lambda h: _target_logit(w["head"], h, pos_b, tok_b, epsilon), h_btd)
    (g_h,) = vjp_logit(jnp.ones((batch,), jnp.float32))
    (g_x,) = vjp_hidden(g_h)
    return _per_token(x_btd, g_x)

  # Answer token j is predicted at prompt_len - 1 + j; rows past the answer explain some real position (clipped
  # into the sequence) and are zeroed below.
  pos_ba = jnp.minimum(prompt_len_b[:, None] - 1 + jnp.arange(answer_rows), length - 2)
  tok_ba = jnp.take_along_axis(tokens_bt, pos_ba + 1, axis=1)
  if batch_size is None:
    per_answer = jax.vmap(one)(pos_ba.T, tok_ba.T)
  else:
    per_answer = jax.lax.map(lambda a: one(*a), (pos_ba.T, tok_ba.T), batch_size=batch_size)
  matrix = jnp.moveaxis(per_answer, 0, 1)  # [b, answer_rows, t]
  keep = ((jnp.arange(answer_rows)[None, :, None] < answer_len_b[:, None, None])
          & (jnp.arange(length)[None, None, :] < prompt_len_b[:, None, None]))
  return jnp.where(keep, matrix, 0.0)


def conservation_report(model, tokens_bt, target_position=None, target_token=None, *,
                        epsilon: float = DEFAULT_EPSILON) -> dict:
  """How well the relevance is conserved, per example and per layer (default target: the last position's
  argmax token).

  Every rule but the softmax one is conservative up to the epsilon stabilisers (the GPT has no biases), so
  for block l, with R_in, R_out the relevance summed over its input and output residual stream and
  absorbed_l = sum R(softmax outputs) - sum R(softmax inputs) of its attention:

    R_in = R_out - absorbed_l   (up to epsilon and float32 rounding)

  Returns arrays (float32): "logit" [b]; "layer_sums" [b, L + 1] (the sums at the residual stream, index 0 =
  input embeddings); "softmax_absorbed" [b, L]; "layer_error" [b, L] = |R_in - R_out| / |R_out|, the relative
  conservation error of each layer; "rule_error" [b, L] = |R_in + absorbed_l - R_out| / |R_out|, what is left
  once the softmax bias terms are accounted for (epsilon and rounding only); "head_error" [b] = |R_L - logit|
  / |logit| across final norm and LM head; "total_error" [b] = |R_0 - logit| / |logit|. The relative errors
  are large where the denominator is near 0 (a layer that passes on almost no relevance): read them with the sums.
  """
  if target_position is None:
    target_position = tokens_bt.shape[1] - 1
  if target_token is None:
    logits, _ = lrp_forward(model, tokens_bt, epsilon=epsilon)
    pos = jnp.broadcast_to(jnp.asarray(target_position, jnp.int32), tokens_bt.shape[:1])
    target_token = jnp.argmax(jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0], axis=-1)
  logit, _, acts, g = _explain(model, tokens_bt, target_position, target_token, epsilon,
                               ("residual", "scores", "probs"))

  def total(name):
    return jnp.stack([jnp.sum(a.astype(jnp.float32) * c, axis=tuple(range(1, a.ndim)))
                      for a, c in zip(acts[name], g[name], strict=False)], axis=1)
  sums, absorbed = total("residual"), total("probs") - total("scores")
  r_in, r_out = sums[:, :-1], sums[:, 1:]
  return {
      "logit": logit, "layer_sums": sums, "softmax_absorbed": absorbed,
      "layer_error": jnp.abs(r_in - r_out) / jnp.abs(r_out),
      "rule_error": jnp.abs(r_in + absorbed - r_out) / jnp.abs(r_out),
      "head_error": jnp.abs(sums[:, -1] - logit) / jnp.abs(logit),
      "total_error": jnp.abs(sums[:, 0] - logit) / jnp.abs(logit),
  }
