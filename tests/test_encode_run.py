"""eval=encode: CSR sparse codes with image and patch coordinates, equal to the dense codes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from discovery_helpers import TRAIT_A, planted_sae, planted_store

from traitsae.data.store import Store, create_store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.codes import SparseCodes, write_sparse_codes


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


def _encode_cfg(root, out_dir, *overrides):
    from discovery_helpers import compose_cfg

    return compose_cfg(
        "evaluate",
        [
            "eval=encode",
            f"run={root / 'run'}",
            f"paths.activations_dir={root / 'activations'}",
            *overrides,
        ],  # fmt: skip
        out_dir=out_dir,
    )


def test_encode_never_overwrites_an_input_or_an_existing_file(planted, tmp_path):
    from traitsae.evaluation.latents.encode import run

    store, _, root = planted
    before = store.path.read_bytes()
    for target in (store.path, root / "run" / "sae.safetensors"):
        with pytest.raises(TraitsaeError, match="is an input of this evaluation"):
            run(_encode_cfg(root, tmp_path, f"eval.output={target}", "eval.overwrite=true"))
    assert store.path.read_bytes() == before
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"keep me")
    with pytest.raises(TraitsaeError, match=r"already exists.*eval\.overwrite=true"):
        run(_encode_cfg(root, tmp_path, f"eval.output={existing}"))
    assert existing.read_bytes() == b"keep me"
    run(_encode_cfg(root, tmp_path, f"eval.output={existing}", "eval.overwrite=true"))
    with SparseCodes(existing) as codes:
        assert codes.d_sae == 32
    nested = tmp_path / "new" / "folder" / "codes.h5"  # a missing folder is created
    assert run(_encode_cfg(root, tmp_path, f"eval.output={nested}")) == nested
    assert sorted(p.name for p in nested.parent.iterdir()) == ["codes.h5"]  # no temporary left


def test_evaluate_accepts_the_sae_backbone_and_refuses_another(planted, tmp_path):
    from traitsae.evaluation.latents.encode import run

    _, _, root = planted
    assert run(_encode_cfg(root, tmp_path, "backbone=tiny", "eval.output=a.h5")).is_file()
    with pytest.raises(TraitsaeError, match=r"backbone=dinov2 .*trained on 'tiny'"):
        run(_encode_cfg(root, tmp_path, "backbone=dinov2", "eval.output=b.h5"))
    (tmp_path / "notes.txt").write_text("not an SAE")
    with pytest.raises(TraitsaeError, match=r"run=\S+notes.txt is a file.*sae=<path"):
        run(_encode_cfg(root, tmp_path, f"run={tmp_path / 'notes.txt'}"))


def test_sae_json_must_match_its_weights(planted, tmp_path):
    import json
    import shutil

    from traitsae.sae.export import load_sae

    _, _, root = planted
    shutil.copytree(root / "run", tmp_path / "run")
    record = json.loads((tmp_path / "run" / "sae.json").read_text())
    record["d_model"] = 32
    (tmp_path / "run" / "sae.json").write_text(json.dumps(record))
    with pytest.raises(TraitsaeError, match=r"says d_model=32, but the weights .* d_model=16"):
        load_sae(tmp_path / "run")


def test_an_unwritable_output_folder_is_named(planted, tmp_path):
    """It used to end in a traceback (mkdir under a file, a read-only mount)."""
    store, sae, _ = planted
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with Store(store.path) as opened, pytest.raises(TraitsaeError, match="a-file.*writable folder"):
        write_sparse_codes(opened, sae, blocker / "codes.h5")


def test_encode_onto_a_full_disk_is_a_clear_error(planted, tmp_path):
    """A file-size limit of 64 KiB (RLIMIT_FSIZE: writes past it fail like a full disk) in a
    subprocess: a one-paragraph error naming the output, exit 0 of the child, no temp file
    left (it used to die with a signal)."""
    import subprocess
    import sys

    store, sae, _ = planted
    out = tmp_path / "codes.h5"
    script = f"""
import resource, sys
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.codes import write_sparse_codes
from traitsae.sae.export import load_sae
sae = load_sae({str(sae.json_path.parent)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    with Store({str(store.path)!r}) as opened:
        write_sparse_codes(opened, sae, __import__("pathlib").Path({str(out)!r}), dtype="float32", progress=False)
except TraitsaeError as err:
    print("ERROR", err)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "ERROR writing the codes to" in proc.stdout and "disk" in proc.stdout, proc.stdout
    assert not out.exists() and not list(tmp_path.glob(".codes.h5.*"))
