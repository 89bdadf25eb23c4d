"""Physics of LMs 2.2 (arXiv 2408.16293): learning from mistakes with retry data on iGSM.

`data` (question + solution rows, loss on the solution, optional masking of wrong steps; tokenizers from
`lwjax.data.igsm.tokenizer`), `evaluate` (batched greedy KV-cache decoding scored by `igsm.check`), `job`
(the `igsm_retry` job: pretraining with retry rate r, LoRA or full finetuning, evaluation, an accuracy
curve during training; it also trains the CPU reasoning testbed's solvers, `experiments/igsm_solver.py`),
`report` (the sweep's metrics as one Markdown table, the accuracy curves as a PNG), `sweep` (every arm of
the sweep as one resumable command).
"""
