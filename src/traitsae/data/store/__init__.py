"""The HDF5 activation store: one file per backbone x dataset x split.

`schema.py` the layout (`SCHEMA`, from which docs/guide/store.md is generated), `reader.py` the read-only `Store`
every later stage uses, `writer.py` the one writer (`StoreWriter` for extraction,
`create_store` for whole in-memory stores).
"""

from traitsae.data.store.reader import Store, missing_store_message, read_fingerprint, stored_rows
from traitsae.data.store.schema import row_offsets, rows_per_chunk, tmp_path
from traitsae.data.store.writer import (
    StoreWriter,
    config_difference,
    create_store,
    store_is_done,
    write_rows,
)

__all__ = [
    "Store",
    "StoreWriter",
    "config_difference",
    "create_store",
    "missing_store_message",
    "read_fingerprint",
    "row_offsets",
    "rows_per_chunk",
    "store_is_done",
    "stored_rows",
    "tmp_path",
    "write_rows",
]
