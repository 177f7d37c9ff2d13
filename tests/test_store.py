"""The HDF5 store: reader API, one-shot writer, incremental crash-safe writer."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from traitsae.data.store import (
    Store,
    StoreWriter,
    create_store,
    missing_store_message,
    row_offsets,
    write_rows,
)
from traitsae.data.store import tmp_path as store_tmp_path
from traitsae.errors import TraitsaeError

N, P, D = 10, 16, 8


def _make(path, **attrs):
    rng = np.random.default_rng(0)
    patches = {1: rng.normal(size=(N, P, D)), 3: rng.normal(size=(N, P, D))}
    cls = {1: rng.normal(size=(N, D)), 3: rng.normal(size=(N, D))}
    images = {
        "path": [f"img{i}.png" for i in range(N)],
        "label": np.arange(N) % 3,
        "species": [f"sp{i % 3}" for i in range(N)],
    }
    base = {"backbone": "tiny", "dataset": "syn", "split": "train", "depth": 4, "grid": [4, 4]}
    create_store(path, patches=patches, cls=cls, images=images, attrs={**base, **attrs})
    return patches, cls


def test_create_store_roundtrip(tmp_path):
    patches, cls = _make(tmp_path / "s.h5")
    with Store(tmp_path / "s.h5") as store:
        assert (store.n_images, store.n_patches, store.d_model) == (N, P, D)
        assert store.layers == [1, 3] and store.depth == 4 and store.grid == (4, 4)
        assert store.complete and store.backbone == "tiny" and store.split == "train"
        assert store.resolve_layer(-1) == 3
        np.testing.assert_array_equal(store.patches(-1)[()], patches[3].astype(np.float16))
        np.testing.assert_array_equal(store.cls(1)[()], cls[1].astype(np.float16))
        assert store.patches(1).dtype == np.float16
        meta = store.metadata
        assert list(meta["species"][:3]) == ["sp0", "sp1", "sp2"]
        assert meta["index"].tolist() == list(range(N)) and meta["valid"].all()
        assert store.metadata_columns == ["species"]
        blocks = list(store.iter_blocks(3, block=4))
        assert [start for start, _ in blocks] == [0, 4, 8]
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), store.patches(3)[()])
        cls_blocks = list(store.iter_blocks(1, tokens="cls", block=6))
        assert cls_blocks[1][1].shape == (4, D)


def test_store_errors_name_layers_and_files(tmp_path):
    _make(tmp_path / "s.h5")
    with (
        Store(tmp_path / "s.h5") as store,
        pytest.raises(TraitsaeError, match=r"holds layers \[1, 3\]"),
    ):
        store.patches(-2)
    with pytest.raises(TraitsaeError, match="does not exist"):
        Store(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(TraitsaeError, match="not a readable HDF5"):
        Store(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(TraitsaeError, match="not a traitsae activation store"):
        Store(tmp_path / "other.h5")
    _make(tmp_path / "partial.h5", complete=False)
    with pytest.raises(TraitsaeError, match="incomplete"):
        Store(tmp_path / "partial.h5")
    assert not Store(tmp_path / "partial.h5", require_complete=False).complete


def test_create_store_rejects_bad_shapes(tmp_path):
    with pytest.raises(TraitsaeError, match="expected"):
        create_store(
            tmp_path / "bad.h5",
            patches={0: np.zeros((2, 4, 3)), 1: np.zeros((2, 5, 3))},
            cls={0: np.zeros((2, 3)), 1: np.zeros((2, 3))},
            images={"path": ["a", "b"]},
            attrs={"backbone": "b", "dataset": "d", "split": "s"},
        )


def _writer(path, fingerprint="fp", overwrite=False):
    attrs = {
        "backbone": "tiny", "dataset": "syn", "split": "train", "depth": 4, "grid": [4, 4],
        "layers": [3], "n_images": N, "d_model": D, "n_patches": P, "n_prefix_tokens": 1,
    }  # fmt: skip
    images = {"index": np.arange(N), "path": [f"p{i}" for i in range(N)], "species": ["s"] * N}
    return StoreWriter.open(
        path, attrs=attrs, images=images, fingerprint=fingerprint, overwrite=overwrite,
    )  # fmt: skip


def _rows(start, n):
    acts = np.arange(start, start + n, dtype=np.float16)[:, None, None] * np.ones(
        (n, P, D), np.float16
    )
    return {3: acts}, {3: acts[:, 0]}


def test_writer_resumes_and_finishes(tmp_path):
    path = tmp_path / "w.h5"
    writer = _writer(path)
    assert writer.first_pending() == 0
    writer.write(0, *_rows(0, 4), valid=np.ones(4, bool))
    writer.close()  # as if the run stopped here
    assert tmp_path.joinpath("w.h5.tmp").exists() and not path.exists()
    with pytest.raises(TraitsaeError, match="different configuration"):
        _writer(path, fingerprint="other")
    writer = _writer(path)
    assert writer.first_pending() == 4
    valid = np.array([True, False, True, True, True, True])
    writer.write(4, *_rows(4, 6), valid=valid, errors={5: "OSError: truncated"})
    assert writer.errors() == {5: "OSError: truncated"}
    assert writer.finish() == path and not tmp_path.joinpath("w.h5.tmp").exists()
    with Store(path) as store:
        assert store.complete
        np.testing.assert_array_equal(store.cls(3)[:, 0], np.arange(N, dtype=np.float16))
        assert store.metadata["valid"].tolist() == [i != 5 for i in range(N)]
        assert store.metadata["error"][5] == "OSError: truncated"


@pytest.mark.parametrize("raw", [True, False])
def test_writer_batches_across_chunks_match_hdf5(tmp_path, monkeypatch, raw):
    """Batches straddling chunk boundaries land in the right rows, through plain file writes
    (the store's own layout) as through HDF5 (the fallback for layouts it cannot place)."""
    monkeypatch.setattr(
        "traitsae.data.store.schema.TARGET_CHUNK_BYTES", 3 * P * D * 2
    )  # 3 rows/chunk
    writer = _writer(tmp_path / "w.h5")
    assert writer._patches[3].chunks[0] == 3
    assert all(offsets is not None for offsets in writer._offsets.values())
    if not raw:
        writer._offsets = dict.fromkeys(writer._offsets)
    for start, n in [(0, 2), (2, 5), (7, 3)]:
        writer.write(start, *_rows(start, n), valid=np.arange(start, start + n) != 4)
    writer.finish()
    with Store(tmp_path / "w.h5") as store:
        expected = np.arange(N, dtype=np.float16)[:, None, None] * np.ones((N, P, D), np.float16)
        np.testing.assert_array_equal(store.patches(3)[()], expected)
        np.testing.assert_array_equal(store.cls(3)[()], expected[:, 0])
        assert store.metadata["valid"].tolist() == [i != 4 for i in range(N)]


def test_raw_row_writes_follow_scattered_chunks(tmp_path):
    """Chunks allocated out of order (not what the writer creates, but HDF5 allows it): rows
    land where HDF5 reads them, whichever chunks a write spans."""
    path = tmp_path / "scattered.h5"
    with h5py.File(path, "w") as f:
        data = f.create_dataset("x", shape=(12, 2, 3), dtype=np.float16, chunks=(4, 2, 3))
        for first in (8, 0, 4):  # allocation order = file order: chunk 8..11 comes first
            data[first : first + 4] = -1
        offsets_N = row_offsets(data)
    assert offsets_N is not None and np.diff(offsets_N).min() < 0
    expected = np.arange(12 * 6, dtype=np.float16).reshape(12, 2, 3)
    fd = os.open(path, os.O_WRONLY)
    try:
        for start, stop in [(0, 3), (3, 9), (9, 12)]:
            write_rows(fd, offsets_N, start, expected[start:stop])
    finally:
        os.close(fd)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][()], expected)


def test_row_offsets_refuses_what_hdf5_must_decode(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset(
            "gzip", data=np.ones((8, 4), np.float16), chunks=(2, 4), compression="gzip"
        )
        f.create_dataset("split_rows", data=np.ones((8, 4), np.float16), chunks=(2, 2))
        f.create_dataset("unallocated", shape=(8, 4), dtype=np.float16, chunks=(2, 4))
        f.create_dataset("big_endian", data=np.ones((8, 4), ">f2"))
        assert all(row_offsets(f[key]) is None for key in f)


def test_writer_overwrite_restarts(tmp_path):
    writer = _writer(tmp_path / "w.h5")
    writer.write(0, *_rows(0, 4), valid=np.ones(4, bool))
    writer.close()
    writer = _writer(tmp_path / "w.h5", fingerprint="other", overwrite=True)
    assert writer.first_pending() == 0
    writer.close()


def test_writer_refuses_unfinished_finish(tmp_path):
    writer = _writer(tmp_path / "w.h5")
    with pytest.raises(RuntimeError, match="pending"):
        writer.finish()
    writer.close()
    assert store_tmp_path(tmp_path / "w.h5").exists() and not (tmp_path / "w.h5").exists()


def test_unwritable_store_directory_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(TraitsaeError, match="cannot create the store directory"):
        _writer(tmp_path / "a_file" / "sub" / "w.h5")


def test_iter_valid_skips_invalid_and_unwanted_images(tmp_path):
    acts = np.arange(10 * 2 * 3, dtype=np.float16).reshape(10, 2, 3)
    valid = np.ones(10, dtype=bool)
    valid[[1, 7]] = False
    path = create_store(
        tmp_path / "s.h5",
        patches={0: acts},
        cls={0: acts[:, 0]},
        images={"path": np.array([f"{i}.png" for i in range(10)]), "valid": valid},
        attrs={"backbone": "b", "dataset": "d", "split": "train", "depth": 1},
    )
    with Store(path) as store:
        rows = [r for r, _ in store.iter_valid(0, block=4)]
        np.testing.assert_array_equal(np.concatenate(rows), [0, 2, 3, 4, 5, 6, 8, 9])
        keep = np.zeros(10, dtype=bool)
        keep[[1, 8, 9]] = True  # 1 is invalid; the first two blocks hold no kept valid image
        pairs = list(store.iter_valid(0, tokens="cls", block=4, keep=keep))
        assert len(pairs) == 1
        np.testing.assert_array_equal(pairs[0][0], [8, 9])
        np.testing.assert_array_equal(pairs[0][1], acts[[8, 9], 0])


def _partial(path, n_done=6):
    """A store as an interrupted extraction leaves it: rows >= n_done never written."""
    acts = np.ones((N, P, D), np.float16) * np.arange(1, N + 1, dtype=np.float16)[:, None, None]
    done = np.arange(N) < n_done
    valid = np.ones(N, bool)
    valid[1] = False
    create_store(
        path, patches={3: acts}, cls={3: acts[:, 0]},
        images={"path": [f"{i}.png" for i in range(N)], "valid": valid, "done": done},
        attrs={"backbone": "tiny", "dataset": "syn", "split": "train", "complete": False},
    )  # fmt: skip
    return valid & done


def test_unwritten_rows_are_never_usable_whatever_the_path(tmp_path):
    usable = _partial(tmp_path / "tiny.h5.tmp")  # named directly, as data.store=<...>.h5.tmp
    with Store(tmp_path / "tiny.h5.tmp", require_complete=False) as store:
        assert not store.complete
        np.testing.assert_array_equal(store.valid, usable)
        np.testing.assert_array_equal(store.metadata["valid"], usable)
        rows = np.concatenate([r for r, _ in store.iter_valid(3, block=4)])
        np.testing.assert_array_equal(rows, np.flatnonzero(usable))
        assert not store.patches(3)[N - 1].any()  # the zeros an unwritten row holds


def test_training_on_a_tmp_store_named_directly_uses_written_rows_only(tmp_path):
    from traitsae.data.datamodule import ActivationsDataModule

    usable = _partial(tmp_path / "tiny.h5.tmp")
    dm = ActivationsDataModule(
        activations_dir=str(tmp_path), backbone="tiny", dataset="syn", split="train",
        store=str(tmp_path / "tiny.h5.tmp"), allow_incomplete=True, layer=-1, tokens="patches",
        val_fraction=0, scale_sample=N * P, num_workers=0, batch_size=16, buffer_vectors=64,
        val_batch_size=None, seed=0, block_images=None,
    )  # fmt: skip
    dm.prepare()
    assert dm.n_train_vectors == usable.sum() * P
    assert (np.abs(dm.sample).sum(1) > 0).all()  # no never-written (zero) row in the sample
    rows = np.arange(1, N + 1)[usable]  # row i holds the value i + 1 in every dimension
    np.testing.assert_allclose(dm.scale, np.sqrt(1 / np.mean(rows.astype(float) ** 2)), rtol=1e-6)


def _foreign(path, drop=(), shape_of_cls=(N, D), columns=()):
    """A store written to the README schema by another tool (raw h5py), minus `drop`."""
    with h5py.File(path, "w") as f:
        f.attrs.update(backbone="other", dataset="d", split="train", d_model=D, n_patches=P,
                       grid=[4, 4], layers=[2], depth=3)  # fmt: skip
        if columns:
            f.attrs["metadata_columns"] = list(columns)
        f["patches/2"] = np.ones((N, P, D), np.float16)
        f["cls/2"] = np.ones(shape_of_cls, np.float16)
        f["images/path"] = np.array([f"{i}.png" for i in range(N)], dtype=object)
        for key in drop:
            del f[key]


def test_a_foreign_store_without_bookkeeping_is_all_usable(tmp_path):
    _foreign(tmp_path / "f.h5")
    with Store(tmp_path / "f.h5", require_complete=False) as store:
        assert (store.d_model, store.n_images, store.layers) == (D, N, [2])
        assert store.valid.all() and store.metadata["index"].tolist() == list(range(N))
        assert (store.metadata["label"] == -1).all() and store.metadata["error"][0] == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop": ["patches/2"]}, r"dataset patches/2 is missing.*promise shape \(10, 16, 8\)"),
        ({"shape_of_cls": (N, D + 1)}, r"dataset cls/2 has shape \(10, 9\)"),
        ({"drop": ["images/path"]}, r"dataset images/path is missing"),
        ({"columns": ["sex"]}, r"dataset images/sex is missing"),
    ],
)
def test_schema_violations_name_the_dataset(tmp_path, kwargs, message):
    _foreign(tmp_path / "f.h5", **kwargs)
    with pytest.raises(TraitsaeError, match=message):
        Store(tmp_path / "f.h5", require_complete=False)


def test_missing_and_incomplete_store_messages(tmp_path):
    _partial(tmp_path / "tiny.h5.tmp")
    message = missing_store_message([tmp_path / "tiny.h5", tmp_path / "b.h5"], ["cmd a", "cmd b"])
    assert f"{tmp_path}/tiny.h5 is incomplete (extraction stopped; " in message
    assert (
        "holds the first 6 of 10 images)" in message
        and f"{tmp_path}/b.h5 does not exist" in message
    )
    assert message.endswith("Make them with:\n  cmd a\n  cmd b")
    with pytest.raises(TraitsaeError, match=r"missing.h5 does not exist. Write it with extract.py"):
        Store(tmp_path / "missing.h5")
