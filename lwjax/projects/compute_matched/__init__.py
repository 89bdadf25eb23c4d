"""Smaller, Weaker, Yet Better (arXiv 2408.16737): compute-matched sampling from a weaker-cheaper and a
stronger-expensive solver, the quality of their data, and finetuning on each."""
