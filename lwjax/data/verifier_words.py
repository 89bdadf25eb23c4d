"""The words of GenRM verification prompts and rationales (arXiv 2408.15240), added to every task tokenizer."""

WORDS = ("verify", "Yes", "No", "ok", "wrong", "step", "=")
