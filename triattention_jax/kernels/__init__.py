"""Pallas kernels for the paths XLA serves badly (see each module)."""
