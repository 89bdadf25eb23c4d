"""GPT shapes by name: `gpt_tiny` (tests) up to `llama2_70b`, and the papers' checkpoints (Gemma-2 2B-27B, Qwen2.5
0.5B-7B, Llama-2-7B, Llama-3.1-8B, Mistral-7B). `configs/gpt.py`
turns them into ConfigDicts for experiments; the library reads them where a config names a shape."""

from lwjax.models.gpt import GPTConfig, RopeScaling

_LLAMA3_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)

PRESETS = {
    "gpt_tiny": GPTConfig(vocab_size=272, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                          d_ff=128, max_seq_len=128),
    # GPT-3 Small width/depth with a Llama block.
    "gpt_125m": GPTConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                          head_dim=64, d_ff=2048, max_seq_len=2048),
    # Llama-3.2-1B shape.
    "gpt_1b": GPTConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, d_ff=8192, max_seq_len=8192, rope_theta=500000.0,
                        rope_scaling=_LLAMA3_ROPE, tie_embeddings=True),
    "llama3_8b": GPTConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                           head_dim=128, d_ff=14336, max_seq_len=8192, rope_theta=500000.0),
    "llama2_70b": GPTConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                            head_dim=128, d_ff=28672, max_seq_len=4096),
    # The papers' checkpoints, by the shapes of their config.json files (load the weights with
    # `model.pretrained`; these name the shape for compiling and sizing without them).
    "llama2_7b": GPTConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                           d_ff=11008, max_seq_len=4096),
    "llama3_1_8b": GPTConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                             d_ff=14336, max_seq_len=131072, rope_theta=500000.0,
                             rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=8192)),
    # Mistral-7B v0.1 (Zephyr-7B, The Mamba in the Llama's teacher): a 4,096-token window on every layer.
    "mistral_7b": GPTConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                            d_ff=14336, max_seq_len=32768, sliding_window=4096),
    **{f"qwen2_5_{name}": GPTConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                                    head_dim=d // heads, d_ff=f, max_seq_len=32768, rope_theta=1000000.0,
                                    norm_eps=1e-6, tie_embeddings=tied, qkv_bias=True)
       for name, vocab, d, layers, heads, kv, f, tied in (
           ("0_5b", 151936, 896, 24, 14, 2, 4864, True), ("1_5b", 151936, 1536, 28, 12, 2, 8960, True),
           ("3b", 151936, 2048, 36, 16, 2, 11008, True), ("7b", 152064, 3584, 28, 28, 4, 18944, False))},
    # Gemma-2: windows of 4,096 on even layers, soft-capped scores (50) and logits (30), GeGLU, 1 + w norms.
    **{f"gemma2_{name}": GPTConfig(vocab_size=256000, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                                   head_dim=hd, d_ff=f, max_seq_len=8192, norm_eps=1e-6, tie_embeddings=True,
                                   sliding_window=4096, full_attention_every=2, attn_logit_softcap=50.0,
                                   final_logit_softcap=30.0, query_pre_attn_scalar=scalar, norm_offset=1.0,
                                   post_norms=True, activation="gelu_tanh", embed_scale=True)
       for name, d, layers, heads, kv, hd, f, scalar in (
           ("2b", 2304, 26, 8, 4, 256, 9216, 256.0), ("9b", 3584, 42, 16, 8, 256, 14336, 256.0),
           ("27b", 4608, 46, 32, 16, 128, 36864, 144.0))},
}
