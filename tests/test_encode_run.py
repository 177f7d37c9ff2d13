"""eval=encode: CSR sparse codes with image and patch coordinates, equal to the dense codes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from discovery_helpers import TRAIT_A, planted_sae, planted_store

from traitsae.data.store import Store, create_store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.encode import SparseCodes, write_sparse_codes


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from traitsae.sae.export import load_sae

    root = tmp_path_factory.mktemp("encode")
    store = planted_store(root, n_per_group=6)
    return store, load_sae(planted_sae(root / "run", store)), root


def with_invalid_row(src, dst, invalid: int):
    """Copy of a store with one image marked unreadable (zero rows, valid=False)."""
    with Store(src) as store:
        acts = store.patches(3)[()]
        acts[invalid] = 0
        meta = dict(store.metadata)
        valid = meta["valid"].copy()
        valid[invalid] = False
        images = {"path": meta["path"], "species": meta["species"], "valid": valid}
        return create_store(
            dst,
            patches={3: acts},
            cls={3: acts.mean(axis=1)},
            images=images,
            attrs={
                "backbone": "tiny",
                "dataset": "synthetic",
                "split": "test",
                "depth": 4,
                "grid": [8, 8],
                "image_size": 64,
            },
        )


def test_sparse_codes_equal_dense_codes(planted, tmp_path):
    store, sae, root = planted
    path = with_invalid_row(store.path, tmp_path / "s.h5", invalid=3)
    with Store(path) as opened:
        write_sparse_codes(opened, sae, tmp_path / "codes.h5", dtype="float32", batch_patches=100)
        acts_NPD = torch.from_numpy(opened.patches(3)[()].astype(np.float32))
    with torch.no_grad():
        dense_NPS = sae.encode(acts_NPD.reshape(-1, 16)).reshape(12, 64, -1).numpy()
    with SparseCodes(tmp_path / "codes.h5") as codes:
        assert codes.first_row[3] == -1 and codes.first_row[4] == 3 * 64
        np.testing.assert_allclose(codes.image_codes(4), dense_NPS[4], rtol=1e-6)
        np.testing.assert_allclose(
            codes.latent_map(0, TRAIT_A), dense_NPS[0, :, TRAIT_A].reshape(8, 8)
        )
        matrix = codes.csr()
        keep = np.delete(np.arange(12), 3)
        np.testing.assert_allclose(
            matrix.toarray(), dense_NPS[keep].reshape(-1, sae.d_sae), rtol=1e-6
        )
        assert list(codes.metadata("species")[:2]) == ["001.Alpha", "001.Alpha"]
        with pytest.raises(TraitsaeError, match="invalid"):
            codes.image_codes(3)
    with h5py.File(tmp_path / "codes.h5") as f:
        image, patch = f["rows/image"][()], f["rows/patch"][()]
        row, col = f["rows/row"][()], f["rows/col"][()]
    np.testing.assert_array_equal(image, np.repeat(keep, 64))
    np.testing.assert_array_equal(row * 8 + col, patch)
    assert not (tmp_path / "codes.h5.tmp").exists()


def test_missing_codes_file_is_a_user_error(tmp_path):
    with pytest.raises(TraitsaeError, match="eval=encode"):
        SparseCodes(tmp_path / "nope.h5")
