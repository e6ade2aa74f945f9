"""natix.engines."""
