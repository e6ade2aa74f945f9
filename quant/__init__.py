"""natix.quant."""
