"""natix.bench."""
