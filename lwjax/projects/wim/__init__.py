"""Writing in the Margins (arXiv 2408.14906): long-context tasks, the reader model, and WiM against
full-context and retrieval-only reading."""
