"""Data shared by several papers: generated corpora, tokenizers, Grain pipelines."""
