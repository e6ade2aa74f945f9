"""natix.scaling."""
