"""The Mamba in the Llama (arXiv 2408.15237): distilling a trained GPT into hybrids."""
