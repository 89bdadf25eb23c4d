"""Every row-based input pipeline gives two processes the two halves of the batch one process gets: the global
batch of a step does not depend on the number of processes (generated rows, packed iGSM problems, WiM rows)."""

import numpy as np
import pytest

from lwjax.data import igsm, pipeline, rows as rows_lib
from lwjax.data.igsm.tokenizer import CompactTokenizer
from lwjax.projects.retry import data as retry_data
from lwjax.projects.wim import data as wim_data, tasks


def _rows(n=40):
  rng = np.random.default_rng(0)
  return [rows_lib.lm_row([1], rng.integers(4, 50, size=rng.integers(2, 9)).tolist(), 12) for _ in range(n)]


PIPELINES = {
    "rows": lambda **kw: rows_lib.shuffled_batches(_rows(), batch_size=8, seed=3, **kw),
    "igsm_packed": lambda **kw: retry_data.make_dataset(
        igsm.IGSMSource(200, seed=0, preset="small", fmt="compact", ops=(1, 2)), CompactTokenizer(), seq_len=128,
        batch_size=8, mask_retries=False, shuffle_seed=1, pack=True, **kw),
    "wim": lambda **kw: wim_data.batches(
        wim_data.documents(4, seed=0, task_names=tasks.TASKS, num_segments=(1, 2), segment_words=32),
        tasks.WiMTokenizer(), seq_len=160, batch_size=8, seed=2, **kw),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_two_processes_split_the_single_process_global_batch(name):
  make = PIPELINES[name]
  whole = iter(make(process_index=0, process_count=1))
  halves = [iter(make(process_index=p, process_count=2)) for p in range(2)]
  for _ in range(3):
    one = next(whole)
    two = [next(h) for h in halves]
    assert all(len(two[p]["inputs"]) == 4 for p in range(2))
    for key in one:
      np.testing.assert_array_equal(np.concatenate([two[0][key], two[1][key]]), one[key])


def test_a_batch_that_does_not_split_names_the_field():
  with pytest.raises(ValueError, match="^train.global_batch_size: 8 does not split over 3 processes"):
    pipeline.process_share(None, 8, process_index=0, process_count=3)
