"""natix.kernels."""
