"""Data: image datasets (images/, synthetic demo) and the HDF5 activation store (store.py)."""
