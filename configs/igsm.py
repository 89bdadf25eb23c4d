"""The CPU reasoning testbed's shared settings: compact iGSM data and the two reference solver sizes.

`experiments/igsm_solver.py` trains the solvers; `experiments/igsm_retry.py` pretrains its arms at the weaker
solver's shape and budget. Both run the `igsm_retry` job (a solver is its retry rate 0 pretraining).
"""

import ml_collections

from configs import gpt

# Reference solvers at the cpu scale: (model shape, steps, learning rate). "weak" is the weaker-cheaper
# solver (<= 30 min on 2 cores), "strong" the stronger-expensive one (<= 60 min).
SOLVERS = {
    "weak": ({"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "head_dim": 32, "d_ff": 512},
             2400, 2e-3),
    "strong": ({"d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 8, "head_dim": 32, "d_ff": 1024},
               1700, 1.5e-3),
}
VOCAB_SIZE = 256  # >= the compact tokenizer's 162 ids; a round size for the embedding and the head
CPU_DATA = {"preset": "small", "fmt": "compact", "train_ops": "1-3", "seq_len": 256, "pack": True,
            "num_train": 2_000_000}
CPU_EVAL = {"ops": "1,2,3,4,5", "num_per_op": 100, "batch_size": 100, "max_new_tokens": 160,
            "curve_ops": "2,3", "curve_num_per_op": 50}
CPU_BATCH = 32  # packed rows of CPU_DATA["seq_len"] tokens


def solver_model(size: str, max_seq_len: int = 512) -> ml_collections.ConfigDict:
  shape, _, _ = SOLVERS[size]
  return gpt.get("gpt_tiny", vocab_size=VOCAB_SIZE, max_seq_len=max_seq_len, **shape)
