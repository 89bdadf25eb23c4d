"""Tests of the byte tokenizer, sentencepiece training on the generated corpus, and get_or_train reuse."""

import pytest

from lwjax.data import corpus, tokenizer

TEXTS = ["Once upon a time.", "héllo  wörld, 你好! 12 + 30 = 42", " leading and trailing spaces  "]


@pytest.fixture(scope="module")
def trained_path(tmp_path_factory):
  docs = corpus.generate_documents(1000, seed=0)
  prefix = str(tmp_path_factory.mktemp("sp") / "story")
  return tokenizer.train_sentencepiece(iter(docs), prefix, vocab_size=512)


def test_byte_tokenizer_round_trips_and_reserves_specials():
  tok = tokenizer.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  for text in TEXTS:
    ids = tok.encode(text)
    assert min(ids) >= 3 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_sentencepiece_round_trips_and_compresses(trained_path):
  tok = tokenizer.load(trained_path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 512)
  num_ids = num_bytes = 0
  for doc in corpus.generate_documents(50, seed=0, split="eval"):
    ids = tok.encode(doc)
    assert tok.decode(ids) == doc
    assert min(ids) > 3  # no pad/bos/eos/unk inside a document
    num_ids, num_bytes = num_ids + len(ids), num_bytes + len(doc.encode("utf-8"))
  assert num_ids < num_bytes / 2
  for text in TEXTS:  # unseen characters go through byte fallback, whitespace is kept as is
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_digits_are_single_tokens(trained_path):
  tok = tokenizer.load(trained_path)
  pieces = [tok.processor.id_to_piece(i) for i in tok.encode("345 plus 12")]
  digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
  assert len(digit_pieces) == 5 and all(sum(c.isdigit() for c in p) == 1 for p in digit_pieces)


def test_bpe_trains_and_bad_model_type_is_named(tmp_path):
  docs = corpus.generate_documents(300, seed=0)
  tok = tokenizer.load(tokenizer.train_sentencepiece(iter(docs), str(tmp_path / "bpe"), 400, model_type="bpe"))
  assert tok.decode(tok.encode(docs[0])) == docs[0]
  with pytest.raises(ValueError, match="model_type"):
    tokenizer.train_sentencepiece(iter(docs), str(tmp_path / "x"), 400, model_type="word")


def test_get_or_train_trains_once_then_reuses(tmp_path, trained_path):
  calls = []

  def texts():
    calls.append(1)
    return iter(corpus.generate_documents(500, seed=3))

  def must_not_train():
    raise AssertionError("a model exists; nothing should be trained")

  first = tokenizer.get_or_train(str(tmp_path), None, texts, 400)
  assert len(calls) == 1 and (tmp_path / tokenizer.MODEL_FILENAME).exists()
  again = tokenizer.get_or_train(str(tmp_path), None, must_not_train, 400)
  doc = corpus.generate_documents(1, seed=0, split="eval")[0]
  assert again.vocab_size == 400 and again.encode(doc) == first.encode(doc)
  given = tokenizer.get_or_train(str(tmp_path), trained_path, must_not_train, 400)
  assert given.vocab_size == 512
