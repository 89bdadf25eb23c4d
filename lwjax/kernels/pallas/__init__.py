"""Pallas kernels (TPU Mosaic and GPU Triton), each tested against `lwjax.kernels.reference`."""
