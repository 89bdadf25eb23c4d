"""WiM's long-context tasks: every answer follows exactly from the document, every margin is what its segment
holds, the vocabulary round-trips, F1 and exact match score as defined."""

from collections import Counter

import pytest

from lwjax.projects.wim import tasks


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("num_segments", [1, 3, 8])
def test_answers_and_margins_follow_from_the_document(task, num_segments):
  tok = tasks.WiMTokenizer()
  for record in tasks.generate(task, 20, seed=num_segments, num_segments=num_segments, segment_words=48):
    assert len(record.segments) == len(record.margins) == len(record.relevant) == num_segments
    assert tok.decode(tok.encode(record.context)) == record.context
    for segment, margin, relevant in zip(record.segments, record.margins, record.relevant, strict=True):
      assert relevant == (margin != tasks.NONE)
      assert segment.split()[0] == tasks.SECTION and tasks.SECTION not in segment.split()[1:]
      if task != "aggregation":
        assert len(segment.split()) == 49
        facts = [f.strip() + " ." for f in margin.split(" .") if f.strip()] if relevant else []
        assert all(f in segment for f in facts)
    words = record.context.split()
    if task == "retrieval":
      value = record.query.split()[1]
      i = words.index(value)
      assert words.count(value) == 1 and words[i:i + 3] == [value, record.answer[0], "."]
      assert len(tasks.assignments(record.context)) == 4
      assert sum(m != tasks.NONE for m in record.margins) == 1
    elif task == "multihop":
      value = record.query.split()[1]
      assignments = {target: source for source, target in tasks.assignments(record.context)}
      chain, target = [], value
      while True:  # follow the chain from the value, in document order of the links
        nxt = [k for k, v in assignments.items() if v == target]
        if not nxt:
          break
        chain += nxt
        target = nxt[0]
      assert tuple(chain) == record.answer
      margin_links = tasks.assignments(" ".join(m for m in record.margins if m != tasks.NONE))
      assert len(margin_links) == len(assignments) == 6  # every link is in some margin
    else:
      for segment in record.segments:
        counts = Counter(w for w in segment.split()[1:] if w != ".")
        assert all(counts[w] == 3 for w in record.answer)
        assert all(n == 1 for w, n in counts.items() if w not in record.answer)
      assert all(m == " ".join(record.answer) for m in record.margins)


def test_scores_and_tokenizer_errors():
  assert tasks.score("retrieval", "v42", ("v42",)) == 1.0 and tasks.score("retrieval", "v41", ("v42",)) == 0.0
  assert tasks.score("multihop", "k01 k02", ("k01", "k02")) == 1.0
  assert tasks.score("multihop", "k02 k01", ("k01", "k02")) == 0.0
  assert tasks.score("aggregation", "w001 w002 w009", ("w001", "w002", "w003")) == pytest.approx(2 / 3)
  assert tasks.score("aggregation", "", ("w001",)) == 0.0
  with pytest.raises(ValueError, match="not in the WiM vocabulary"):
    tasks.WiMTokenizer().encode("k01 = hello")
  with pytest.raises(ValueError, match="task="):
    tasks.generate("summary", 1, seed=0, num_segments=1, segment_words=48)
  assert tasks.generate("retrieval", 3, seed=5, num_segments=2, segment_words=48) == tasks.generate(
      "retrieval", 3, seed=5, num_segments=2, segment_words=48)


@pytest.mark.parametrize("task", ["retrieval", "multihop"])
def test_the_answer_is_not_at_a_fixed_place_among_the_facts(task):
  """A reader must match the queried value: the answer's fact is not always the first (or last) assignment."""
  places = Counter()
  for record in tasks.generate(task, 200, seed=3, num_segments=1, segment_words=48):
    keys = [target for _, target in tasks.assignments(record.context)]
    places[keys.index(record.answer[0])] += 1
  assert len(places) >= 3 and max(places.values()) < 0.6 * 200, places
