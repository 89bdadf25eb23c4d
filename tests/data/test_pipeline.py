"""Tests of the LM pipeline: packing invariants, determinism, exact resume, shards, TFDS, batches."""

import itertools
import json
import math
import random

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tensorflow_datasets.text.lm1b  # noqa: F401  registers "lm1b" for tfds.data_source

from lwjax.data import corpus, pipeline
from lwjax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SEQ_LEN = 32


def _docs(n=40, seed=0):
  """Documents of length 1..80 bytes: shorter than, equal to and longer than a row, and non-ASCII."""
  rng = random.Random(seed)
  return [f"{i}:" + "".join(rng.choice("abcdé ") for _ in range(rng.randint(0, 78))) for i in range(n)]


def _dataset(source, **kwargs):
  kwargs = {"seq_len": SEQ_LEN, "global_batch_size": 4, "shuffle_seed": 0, "num_epochs": 1, "process_index": 0,
            "process_count": 1, **kwargs}
  return pipeline.make_lm_dataset(source, TOK, **kwargs)


def _decoded_docs(batches):
  """The documents of a finite run, in order: the non-padding inputs of all rows, cut at each bos."""
  tokens = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  starts = np.flatnonzero(tokens == TOK.bos_id)
  assert starts[0] == 0
  docs = []
  for doc in np.split(tokens, starts[1:]):
    assert doc[-1] == TOK.eos_id and TOK.bos_id not in doc[1:] and TOK.eos_id not in doc[:-1]
    docs.append(TOK.decode(doc))
  return docs


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for e, a in zip(expected, actual, strict=False):
    assert e.keys() == a.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], a[k], err_msg=k)


def test_batch_format_and_packing_invariants():
  batches = list(_dataset(_docs()))
  for batch in batches:
    assert set(batch) == set(pipeline.BATCH_FIELDS)
    for k, v in batch.items():
      assert v.shape == (4, SEQ_LEN) and v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    for inputs, targets, seg, pos, mask in zip(*(batch[k] for k in pipeline.BATCH_FIELDS), strict=False):
      is_doc = seg > 0
      assert np.all(np.diff(is_doc.astype(int)) <= 0), "padding only at the end of a row"
      ids = seg[is_doc]
      assert ids.size == 0 or (ids[0] == 1 and set(np.diff(ids)) <= {0, 1}), "segments numbered 1..k"
      same_next = np.append(is_doc[:-1] & (seg[1:] == seg[:-1]), False)
      np.testing.assert_array_equal(mask, same_next.astype(np.float32))
      np.testing.assert_array_equal(targets[:-1][same_next[:-1]], inputs[1:][same_next[:-1]])
      assert np.all(targets[~same_next] == TOK.pad_id) and np.all(inputs[~is_doc] == TOK.pad_id)
      assert np.all(pos[~is_doc] == 0)
      for s in np.unique(ids):
        np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
      assert TOK.bos_id not in targets[mask > 0], "no target crosses into the next document"
  # Only the final batch of a finite run holds padding; a lone short document is still one full row.
  assert all(np.all(b["segment_ids"] > 0) for b in batches[:-1])


def test_no_token_lost_and_order_kept_without_shuffle():
  docs = _docs()
  assert _decoded_docs(list(_dataset(docs, shuffle_seed=None))) == docs
  shuffled = _decoded_docs(list(_dataset(docs, shuffle_seed=3)))
  assert shuffled != docs and sorted(shuffled) == sorted(docs)


def test_deterministic_for_a_seed_and_reshuffled_each_epoch():
  docs = _docs()
  _assert_batches_equal(list(_dataset(docs, shuffle_seed=5)), list(_dataset(docs, shuffle_seed=5)))
  assert _decoded_docs(list(_dataset(docs, shuffle_seed=5))) != _decoded_docs(list(_dataset(docs, shuffle_seed=6)))
  two_epochs = _decoded_docs(list(_dataset(docs, shuffle_seed=5, num_epochs=2)))
  first, second = two_epochs[:len(docs)], two_epochs[len(docs):]
  assert sorted(first) == sorted(second) == sorted(docs) and first != second


# Rows of exactly one document each leave no remainder in the packer's state: the case grain
# 0.2.18 restores wrongly from JSON without `_JsonSafePackState`.
EXACT_FIT_DOCS = [f"d{i:0{SEQ_LEN - 3}d}" for i in range(40)]


@pytest.mark.parametrize("docs", [_docs(), EXACT_FIT_DOCS], ids=["ragged", "exact_fit"])
@pytest.mark.parametrize("num_epochs", [None, 1])
@pytest.mark.parametrize("num_shards", [1, 2], ids=["one_shard", "two_shards"])
def test_iterator_resumes_exactly_from_its_state(docs, num_epochs, num_shards):
  ds = _dataset(docs, shuffle_seed=1, num_epochs=num_epochs, num_shards=num_shards)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what the Orbax handler writes and reads
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  next(resumed)
  resumed.set_state(state)
  _assert_batches_equal(expected, [next(resumed) for _ in range(3)])


@pytest.mark.parametrize("num_shards", [1, 2], ids=["one_shard", "two_shards"])
def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(tmp_path, num_shards):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = _dataset(EXACT_FIT_DOCS, shuffle_seed=2, num_epochs=None, num_shards=num_shards)
  it = iter(ds)
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_batches_equal(expected, [next(resumed) for _ in range(3)])


def test_processes_read_disjoint_shards_covering_all_docs():
  docs = _docs(41)
  seen = []
  for index in range(2):
    batches = list(_dataset(docs, global_batch_size=8, process_index=index, process_count=2))
    assert batches[0]["inputs"].shape == (4, SEQ_LEN)
    seen.append(_decoded_docs(batches))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(docs)


@pytest.mark.parametrize("num_epochs", [None, 1])
@pytest.mark.parametrize("num_shards, process_count", [(2, 1), (4, 1), (4, 2)])
def test_fixed_shards_give_the_same_global_batches_on_any_process_count(num_shards, process_count, num_epochs):
  """Process p's batch is the concatenation of the batches of one process per shard, shards p*k..p*k+k-1."""
  docs, batch_size = _docs(41), 8

  def batches(**kwargs):
    ds = _dataset(docs, global_batch_size=batch_size, shuffle_seed=1, num_epochs=num_epochs, **kwargs)
    return list(itertools.islice(ds, 12) if num_epochs is None else ds)

  per_shard = [batches(process_index=s, process_count=num_shards) for s in range(num_shards)]
  k = num_shards // process_count
  for index in range(process_count):
    local = batches(process_index=index, process_count=process_count, num_shards=num_shards)
    shards = per_shard[index * k:(index + 1) * k]
    # A finite shard that has ended contributes padding rows until the last one ends.
    padding = {f: np.zeros_like(v) for f, v in shards[0][0].items()}
    expected = [{f: np.concatenate([b[f] for b in step]) for f in padding}
                for step in itertools.zip_longest(*shards, fillvalue=padding)]
    _assert_batches_equal(expected, local)
    assert local[0]["inputs"].shape == (batch_size // process_count, SEQ_LEN)


def test_sharded_finite_run_resumes_exactly_from_every_step():
  """Odd documents are short, so shard 1 ends first: resume before, at and after that point."""
  docs = [f"{i}:" + ("long " * 12 if i % 2 == 0 else "s") for i in range(24)]
  ds = _dataset(docs, num_shards=2)
  full = list(ds)
  assert np.any(full[-1]["segment_ids"][:2] > 0) and np.all(full[-1]["segment_ids"][2:] == 0)
  for step in range(len(full) + 1):
    it = iter(ds)
    for _ in range(step):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(ds)
    resumed.set_state(state)
    _assert_batches_equal(full[step:], list(resumed))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="global_batch_size"):
    _dataset(_docs(), global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="global_batch_size"):
    _dataset(_docs(), global_batch_size=6, num_shards=4)
  for num_shards, process_count in [(3, 2), (0, 1)]:
    with pytest.raises(ValueError, match="num_shards"):
      _dataset(_docs(), num_shards=num_shards, process_count=process_count)
  with pytest.raises(ValueError, match="seq_len"):
    _dataset(_docs(), seq_len=1)


def test_text_files_and_glob(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\n\nsecond dóc\n", encoding="utf-8")
  (tmp_path / "b.txt").write_text("third doc", encoding="utf-8")
  (tmp_path / "empty.txt").write_text("")
  source = pipeline.TextLineSource(str(tmp_path / "*.txt"))
  assert [source[i] for i in range(len(source))] == ["first doc", "second dóc", "third doc"]
  paths = corpus.write_corpus(str(tmp_path / "corpus"), num_train_docs=30, num_eval_docs=0, seed=0)
  source = pipeline.TextLineSource(paths["train"])
  assert list(source) == corpus.generate_documents(30, seed=0)
  assert _decoded_docs(list(_dataset(source, shuffle_seed=None))) == list(source)


def test_tfds_data_source_under_mock_data():
  """`tfds.data_source` on the mocked lm1b builder (no TensorFlow): every text comes through once."""
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = pipeline.tfds_text("lm1b", split="train")
    texts = [source[i] for i in range(len(source))]
    batches = list(_dataset(source, shuffle_seed=None))
  assert len(texts) == 12 and all(isinstance(t, str) and t for t in texts)
  assert _decoded_docs(batches) == texts


def test_global_batch_equals_local_batch_on_one_process():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  batch_size = 2 * len(jax.devices())
  local = next(iter(_dataset(_docs(), global_batch_size=batch_size, num_epochs=None)))
  arrays = pipeline.global_batch(local, sharding)
  for k, v in local.items():
    assert isinstance(arrays[k], jax.Array) and arrays[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(arrays[k]), v)


def test_global_batch_on_a_one_device_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  local = next(iter(_dataset(_docs())))
  arrays = pipeline.global_batch(local, sharding)
  for k, v in local.items():
    assert arrays[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(arrays[k]), v)


def test_unigram_cross_entropy_by_hand():
  # Train counts [2, 1, 0] over vocab 3, add-one: p = [3/6, 2/6, 1/6]; eval tokens 0 and 2.
  expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
  assert pipeline.unigram_cross_entropy([2, 1, 0], [1, 0, 1]) == pytest.approx(expected)
  # Counts of scored targets only; the masked target 2 is not counted.
  batches = [{"targets": np.array([[0, 0], [1, 2]]), "loss_mask": np.array([[1.0, 1.0], [1.0, 0.0]])}]
  np.testing.assert_array_equal(pipeline.token_counts(batches, 3), [2, 1, 0])
  with pytest.raises(ValueError, match="at least one eval token"):
    pipeline.unigram_cross_entropy([1, 1, 1], [0, 0, 0])


def test_take_padded_yields_exactly_n_batches_padding_with_zeros():
  batches = [{"inputs": np.ones((2, 3), np.int32), "loss_mask": np.ones((2, 3), np.float32)}] * 2
  taken = list(pipeline.take_padded(iter(batches), 4))
  assert len(taken) == 4 and taken[1]["loss_mask"].sum() == 6
  assert taken[3]["loss_mask"].sum() == 0 and taken[3]["inputs"].shape == (2, 3)
  assert len(list(pipeline.take_padded(iter(batches), 1))) == 1

