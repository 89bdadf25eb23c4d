"""GPT shapes by name: `gpt_tiny` (tests) up to `llama2_70b` (the shapes of the public models). `configs/gpt.py`
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
}
