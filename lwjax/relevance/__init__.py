"""Relevance attribution for lwjax's GPT: AttnLRP (Achtibat et al., ICML 2024), as LRP4RAG (arXiv 2408.15533)
uses it, and the gradient x input and attention rollout baselines it is compared with."""
