"""lwjax: JAX/Flax NNX re-implementations of eight ML papers of the week of 25-31 Aug 2024."""

from lwjax import allocator

allocator.keep_freed_memory()
