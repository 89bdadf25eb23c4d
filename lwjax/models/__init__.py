"""Flax NNX models. No training logic and no mesh axis names here: logical axes only. `load_pretrained` reads a
Hugging Face checkpoint or an lwjax workdir (`lwjax.models.pretrained`)."""


def __getattr__(name):
  if name == "load_pretrained":  # imported on use: importing one model module stays light
    from lwjax.models.pretrained import load_pretrained
    return load_pretrained
  raise AttributeError(f"module 'lwjax.models' has no attribute {name!r}")
