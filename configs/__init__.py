"""Shared config building blocks the experiments import: model presets, mesh presets, sharding rules."""
