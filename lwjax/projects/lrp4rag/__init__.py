"""LRP4RAG (arXiv 2408.15533): hallucination detection in RAG from AttnLRP relevance, on a synthetic RAG task."""
