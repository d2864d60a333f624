"""Compute kernels: GGUF dequantization in torch, packed int4 linear, attention and norms."""
