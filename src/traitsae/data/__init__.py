"""Data: image sources, the HDF5 activation store and the training stream (never the SAE)."""
