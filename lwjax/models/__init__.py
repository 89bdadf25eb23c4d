"""Flax NNX models. No training logic and no mesh axis names here: logical axes only."""
