"""Pallas kernels that skip the zeros of fixed sparse masks (TPU and GPU), with XLA references."""
