"""Published question-answering sets read from their local files, RULER's common-words extraction generated here,
long documents assembled from them as Writing in the Margins does (arXiv 2408.14906, §4), and the scores of the
official scripts.

- `sets`: HotpotQA (distractor setting), SQuAD v2 and MultiHop-RAG as `QAExample`s with the pool of passages
  their distractors are drawn from;
- `cwe`: RULER's common-words extraction (the list, the answer), seeded;
- `documents`: gold passages among distractors up to a target token length, shuffled, cut into segments;
- `scoring`: SQuAD's exact match and F1, RULER's string match.
"""
