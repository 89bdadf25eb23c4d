"""GenRM (Generative Verifiers, arXiv 2408.15240): verifiers trained on labelled candidates, Best-of-N."""
