"""The two algorithmic tasks of GenRM (Generative Verifiers, arXiv 2408.15240, Sec. 4): last-letter
concatenation and word sorting, trained on short word lists and tested on longer ones (easy-to-hard), here
generated locally from a pseudo-word list, with exact step checkers and one exact tokenizer.

  records = word_sort.generate(1000, seed=0, num_words=TRAIN_NUM_WORDS)
  word_sort.check(records[0], records[0]["solution"]).correct          # True
  AlgorithmicTokenizer().encode(records[0]["question"])

Modules: `words` (the pseudo-word list, word lists), `text` (the shared text format), `last_letter` and
`word_sort` (each: `generate`, `steps`, `reference_steps`, `check`, `ERROR_KINDS`), `verdict` (`Verdict`
and the step-by-step check), `tokenizer` (`AlgorithmicTokenizer`).
"""

from lwjax.data.algorithmic import last_letter, word_sort
from lwjax.data.algorithmic.tokenizer import AlgorithmicTokenizer
from lwjax.data.algorithmic.verdict import Verdict
from lwjax.data.algorithmic.words import vocabulary

TASKS = {"last_letter": last_letter, "word_sort": word_sort}
# Ours, for both tasks (not the paper's lengths): its split, short lists for training and longer, unseen
# lengths for testing, at a size for small models.
TRAIN_NUM_WORDS = (2, 3, 4)
TEST_NUM_WORDS = (5, 6)

__all__ = ["TASKS", "TEST_NUM_WORDS", "TRAIN_NUM_WORDS", "AlgorithmicTokenizer", "Verdict", "last_letter",
           "vocabulary", "word_sort"]
