"""Serving: paged KV cache, continuous-batching engine, samplers, OpenAI-compatible server (NanoFlow)."""
