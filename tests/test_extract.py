"""extract(cfg) end to end: correctness, resume after a real kill, safety, invalid images, shards."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from extract_helpers import (
    compose_extract,
    hooked_residual_stream,
    read_all,
    run_cli,
    small_synthetic,
)
from PIL import Image

from traitsae.backbones import build_backbone
from traitsae.backbones.timm_vit import create_timm_model
from traitsae.data.store import Store, schema
from traitsae.errors import TraitsaeError
from traitsae.extraction import encode_batch, extract
from traitsae.paths import store_path_from_cfg


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    return small_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, syn_root):
    """An uninterrupted single-process run (layers 1 and 3) that other tests compare against."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = compose_extract(tmp, [f"dataset.root={syn_root}", "backbone.layers=[1,-1]"])
    return extract(cfg), cfg


def test_store_equals_forward_hook_on_the_same_images(reference_store):
    path, cfg = reference_store
    with Store(path) as store:
        assert store.layers == [1, 3] and store.n_images == 16 and store.grid == (8, 8)
        meta = store.metadata
        assert meta["species"][0] == "001.Alpha_warbler" and meta["image_id"][:2].tolist() == [
            "1",
            "3",
        ]
        assert meta["valid"].all() and meta["label"][:2].tolist() == [0, 0]
        backbone = build_backbone(cfg.backbone)
        x = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in meta["path"]])
        model = create_timm_model(cfg.backbone).eval()
        hooked = hooked_residual_stream(model.blocks, lambda: model(x), [1, 3])
        for layer in (1, 3):
            expected = hooked[layer].to(torch.float16).numpy()
            np.testing.assert_array_equal(store.patches(layer)[()], expected[:, 1:])
            np.testing.assert_array_equal(store.cls(layer)[()], expected[:, 0])
        assert "backbone:" in store.config and store.file.attrs["image_size"] == 64


def test_an_extracted_store_holds_exactly_the_schema_keys(reference_store):
    """Every key extraction writes is in `schema.SCHEMA` and every key there is written: the
    schema (and docs/guide/store.md, generated from it) cannot lose or miss a key."""
    path, _ = reference_store
    with Store(path) as store:
        attrs = set(store.file.attrs)
        datasets = set()
        store.file.visititems(
            lambda name, obj: datasets.add(name) if hasattr(obj, "shape") else None
        )
        columns, layers = store.metadata_columns, store.layers
    expected_attrs, expected_datasets = set(), set()
    for key in schema.SCHEMA:
        if key.kind == "attr":
            expected_attrs.add(key.name)
        elif "<L>" in key.name:
            expected_datasets |= {key.name.replace("<L>", str(layer)) for layer in layers}
        elif "<column>" in key.name:
            expected_datasets |= {f"images/{column}" for column in columns}
        else:
            expected_datasets.add(key.name)
    assert columns == ["image_id", "species"]
    assert attrs == expected_attrs and datasets == expected_datasets


def test_rerun_is_a_noop_and_config_mismatch_is_an_error(reference_store, syn_root):
    path, cfg = reference_store
    before = path.stat().st_mtime_ns
    root = str(path).split("/activations/")[0]
    same = compose_extract(root, [f"dataset.root={syn_root}", "backbone.layers=[1,-1]"])
    assert extract(same) == path and path.stat().st_mtime_ns == before
    other = compose_extract(root, [f"dataset.root={syn_root}", "backbone.layers=[-2]"])
    with pytest.raises(
        TraitsaeError, match=r"backbone.layers: \[1, 3\] -> \[2\].*extract.overwrite=true"
    ):
        extract(other)


def test_overwrite_replaces_a_different_store(tmp_path, syn_root):
    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", "split=test"])
    extract(cfg)
    cfg2 = compose_extract(
        tmp_path,
        [f"dataset.root={syn_root}", "split=test", "backbone.layers=[0]", "extract.overwrite=true"],
    )
    with Store(extract(cfg2)) as store:
        assert store.layers == [0]


def test_unreadable_images_are_recorded_and_marked_invalid(tmp_path, syn_root):
    root = shutil.copytree(syn_root, tmp_path / "syn")
    paths = sorted((root / "images").rglob("*.png"))
    paths[0].write_bytes(b"not a png")  # image id 1: train row 0
    paths[2].unlink()  # image id 3: train row 1
    cfg = compose_extract(
        tmp_path, ["dataset=cub", f"dataset.root={root}", "extract.num_workers=1"]
    )
    with Store(extract(cfg)) as store:
        meta = store.metadata
        assert meta["valid"].tolist() == [False, False] + [True] * 14
        assert "UnidentifiedImageError" in meta["error"][0]
        assert "FileNotFoundError" in meta["error"][1] and meta["error"][2] == ""
        assert not store.patches(-1)[0].any()  # zero-filled, and flagged invalid


def test_overflow_is_detected_with_image_layer_and_count(tmp_path, syn_root):
    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}"])
    backbone = build_backbone(cfg.backbone)
    with torch.no_grad():
        backbone.trunk.patch_embed.proj.weight.mul_(1e6)  # pushes activations past float16 range
    from traitsae.data.images import ImageDataset

    dataset = ImageDataset(["a.png", "b.png"], backbone.transform, 64)
    batch = {
        "image": torch.rand(2, 3, 64, 64), "index": torch.tensor([0, 1]),
        "ok": torch.tensor([True, True]), "error": ["", ""],
    }  # fmt: skip
    _, _, _, valid, errors, _ = encode_batch(cfg, backbone, batch, dataset, torch.device("cpu"))
    assert not valid.any() and "at layer 3" in errors[0] and "overflowing" in errors[0]
    cfg.extract.on_nonfinite = "error"
    with pytest.raises(TraitsaeError, match=r"image a.png \(row 0\): \d+ non-finite"):
        encode_batch(cfg, backbone, batch, dataset, torch.device("cpu"))


def test_killed_run_resumes_to_an_identical_store(tmp_path, syn_root):
    """SIGKILL once rows 8..16 are written but before they are committed, then rerun.

    The reference is the same command run uninterrupted: another batch size would be another
    computation (GEMM blocking depends on the batch), which can differ by a float16 ULP."""

    def args(root: Path) -> list[str]:
        return [
            f"paths.root_dir={root}", f"dataset.root={syn_root}", "backbone.layers=[1,-1]",
            "extract.batch_size=8", "extract.num_workers=0", "extract.progress=false",
        ]  # fmt: skip

    store = Path("activations") / "synthetic" / "train" / "tiny.h5"
    uninterrupted = run_cli(args(tmp_path / "ref"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    killed = run_cli(args(tmp_path), env={"TRAITSAE_KILL_AFTER_ROWS": "12"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / store
    assert not out.exists() and out.with_name("tiny.h5.tmp").exists()
    resumed = run_cli(args(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "at image 8 of 16" in resumed.stdout
    a, b = read_all(tmp_path / "ref" / store), read_all(out)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_two_shard_processes_equal_one_process(tmp_path, reference_store, syn_root):
    ref_path, _ = reference_store
    cfg = compose_extract(
        tmp_path,
        [
            f"dataset.root={syn_root}",
            "backbone.layers=[1,-1]",
            "extract.num_shards=2",
            "extract.devices=[cpu,cpu]",
        ],
    )
    out = extract(cfg)
    assert out == store_path_from_cfg(cfg) and not list(out.parent.glob("*.shard-*"))
    a, b = read_all(ref_path), read_all(out)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype == np.float16:  # batch composition may change float rounding slightly
            np.testing.assert_allclose(a[key], b[key], rtol=1e-2, atol=1e-2, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with Store(out) as store, Store(ref_path) as ref:
        assert store.file.attrs["config"] == ref.file.attrs["config"]


def test_single_shard_job_then_join(tmp_path, syn_root):
    common = [f"dataset.root={syn_root}", "split=test", "extract.num_shards=2"]
    shard1 = extract(compose_extract(tmp_path, [*common, "extract.shard=1"]))
    assert shard1.name == "tiny.shard-001-of-002.h5"
    with Store(shard1) as store:
        assert store.metadata["index"].tolist() == list(range(8, 16))
    extract(compose_extract(tmp_path, [*common, "extract.shard=0"]))  # e.g. Slurm array tasks
    cfg = compose_extract(tmp_path, common)
    extract(cfg)  # every shard is complete: only joins
    with Store(store_path_from_cfg(cfg)) as store:
        assert store.metadata["index"].tolist() == list(range(16)) and store.n_images == 16


def test_cli_bad_input_prints_one_paragraph(tmp_path):
    result = run_cli([f"paths.root_dir={tmp_path}", "dataset=cub", "extract.progress=false"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: CUB dataset root") and "Traceback" not in result.stderr


def _assert_same_store(a_path, b_path):
    a, b = read_all(a_path), read_all(b_path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("backbone.layers=[a]", r"backbone.layers=\['a'\] for 'tiny' must be a list of block"),
        ("backbone.layers=2", r"backbone.layers=2 for 'tiny' must be a list of block indices"),
        (f"extract.device=cuda:{torch.cuda.device_count() + 3}", r"this machine has \d CUDA dev"),
        ("extract.device=tpu9", r"extract.device='tpu9' is not a device"),
        ("extract.batch_size=0", r"extract.batch_size=0 must be an integer >= 1"),
        ("extract.num_workers=-1", r"extract.num_workers=-1 must be an integer >= 0"),
        ("extract.devices=[cpu,cuda:99]", r"extract.devices='cuda:99'"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, syn_root, override, message):
    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", override])
    with pytest.raises(TraitsaeError, match=message):
        extract(cfg)
    assert not list(tmp_path.rglob("*.h5*"))


def test_full_disk_stops_clearly_and_the_rerun_resumes(
    tmp_path, reference_store, syn_root, monkeypatch
):
    """ENOSPC in the middle of the run (the second batch's writes), then the same command."""
    import errno
    import os

    ref_path, _ = reference_store
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 6:  # one batch: patches and cls of 2 layers, valid, foreground
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", "backbone.layers=[1,-1]"])
    with pytest.raises(TraitsaeError, match=r"(?s)the disk is full.*holds the first 8 of 16 im.*"
                       r"Free space under .*run the same command again: it resumes"):  # fmt: skip
        extract(cfg)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    _assert_same_store(ref_path, extract(cfg))


def test_file_size_limit_and_free_space_are_checked_first(
    tmp_path, reference_store, syn_root, monkeypatch
):
    import resource
    import shutil as sh

    from traitsae.data.store import writer

    ref_path, _ = reference_store
    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", "backbone.layers=[1,-1]"])
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda _: sh._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(
        TraitsaeError, match=r"tiny.h5.tmp needs 1.\d MiB more, but only 1000 B are free"
    ):
        extract(cfg)
    monkeypatch.undo()
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    monkeypatch.setattr(writer.resource, "getrlimit", lambda _: (200_000, hard))
    with pytest.raises(TraitsaeError, match=r"above this process's file-size limit .*ulimit -f"):
        extract(cfg)
    assert not list(tmp_path.rglob("*.h5*"))  # nothing half-made
    monkeypatch.undo()
    _assert_same_store(ref_path, extract(cfg))


def test_an_unreadable_leftover_is_restarted_not_called_another_config(
    tmp_path, reference_store, syn_root, caplog
):
    """What a crash while the file was being created used to leave (the rerun then said
    "different configuration"): a truncated .tmp."""
    ref_path, _ = reference_store
    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", "backbone.layers=[1,-1]"])
    leftover = store_path_from_cfg(cfg).with_name("tiny.h5.tmp")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(ref_path.read_bytes()[:5000])
    with caplog.at_level("WARNING"):
        _assert_same_store(ref_path, extract(cfg))
    assert "is unreadable (left by a crash); starting it again" in caplog.text


def test_ctrl_c_says_where_it_stopped_and_the_rerun_resumes(tmp_path, reference_store, syn_root):
    ref_path, _ = reference_store
    args = [
        f"paths.root_dir={tmp_path}", f"dataset.root={syn_root}", "backbone.layers=[1,-1]",
        "extract.batch_size=8", "extract.num_workers=0", "extract.progress=false",
    ]  # fmt: skip
    stopped = run_cli(args, env={"TRAITSAE_KILL_AFTER_ROWS": "8", "TRAITSAE_KILL_SIGNAL": "INT"})
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert re.search(
        r"interrupted: stopped by Ctrl-C; \S+tiny.h5.tmp holds the first (8|16) of 16 images. "
        r"Run the same command again to resume.", stopped.stderr
    ), stopped.stderr[-2000:]  # fmt: skip
    _assert_same_store(ref_path, extract(compose_extract(tmp_path, args[1:])))


def test_a_second_extraction_of_one_store_refuses(tmp_path, syn_root):
    import socket
    import subprocess
    import sys

    from traitsae.locks import lock_path

    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", "split=test"])
    lock = lock_path(store_path_from_cfg(cfg))
    lock.parent.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f'{{"pid": {owner.pid}, "host": "{socket.gethostname()}"}}')
        with pytest.raises(TraitsaeError, match=rf"being written by another extraction \(pid "
                           rf"{owner.pid} on host .*delete the lock file"):  # fmt: skip
            extract(cfg)
    finally:
        owner.kill()
        owner.wait()
    with Store(extract(cfg)) as store:  # the owner is gone: its lock is stale and taken over
        assert store.complete
    assert not lock.exists()


def test_file_names_that_are_not_utf8_round_trip(tmp_path):
    import os

    root = tmp_path / "folder"
    weird_class = os.fsdecode(b"Heliconius_\xe9rato")  # latin-1 bytes: not valid utf-8
    for cls in (weird_class, "plain"):
        (root / "train" / cls).mkdir(parents=True)
    names = [
        root / "train" / weird_class / os.fsdecode(b"caf\xe9.png"),
        root / "train" / "plain" / "a.png",
    ]
    for name in names:
        Image.new("RGB", (64, 64), (200, 10, 10)).save(name)
    broken = root / "train" / "plain" / os.fsdecode(b"b\xff.png")
    broken.write_bytes(b"not a png")
    cfg = compose_extract(tmp_path, ["dataset=imagefolder", f"dataset.root={root}"])
    with Store(extract(cfg)) as store:
        meta = store.metadata
        assert sorted(meta["path"]) == sorted(str(p) for p in [*names, broken])
        assert set(meta["species"]) == {weird_class, "plain"}
        row = list(meta["path"]).index(str(broken))
        assert not meta["valid"][row] and "UnidentifiedImageError" in meta["error"][row]
        assert meta["valid"].sum() == 2 and all(Path(p).exists() for p in meta["path"])


def _stop_after_first_batch(monkeypatch, cfg) -> None:
    """Run `cfg` until the second batch's first write fails with ENOSPC (8 of 16 rows kept)."""
    import errno
    import os

    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 4:  # one batch of one layer: patches, cls, valid, foreground
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(TraitsaeError, match="holds the first 8 of 16 images"):
        extract(cfg)
    monkeypatch.setattr(os, "pwrite", real_pwrite)


def test_resume_refuses_an_image_folder_that_changed_but_kept_its_count(
    tmp_path, syn_root, monkeypatch
):
    """Rows 0..7 were stored, then images were swapped (same paths, same count): resuming would
    put the old images' activations next to the new images' paths."""
    root = shutil.copytree(syn_root, tmp_path / "syn")
    cfg = compose_extract(tmp_path, ["dataset=cub", f"dataset.root={root}"])
    _stop_after_first_batch(monkeypatch, cfg)
    paths = sorted((root / "images").rglob("*.png"))
    (root / "images" / "extra.png").write_bytes(b"not an image" * 100)
    listing = (
        (root / "images.txt")
        .read_text()
        .replace(str(paths[0].relative_to(root / "images")), "extra.png")
    )
    (root / "images.txt").write_text(listing)  # row 0 now names another file
    with pytest.raises(TraitsaeError, match=r"(?s)image list.*extract.overwrite=true"):
        extract(cfg)
    cfg.extract.overwrite = True
    with Store(extract(cfg)) as store:
        assert store.metadata["path"][0].endswith("extra.png") and not store.metadata["valid"][0]


def test_a_renamed_image_after_a_complete_run_is_not_nothing_to_do(tmp_path, syn_root):
    root = shutil.copytree(syn_root, tmp_path / "syn")
    cfg = compose_extract(tmp_path, ["dataset=cub", f"dataset.root={root}", "split=test"])
    extract(cfg)
    listing = (root / "images.txt").read_text().splitlines()
    last_id, last_rel = listing[-1].split(maxsplit=1)  # id 32: a test image
    (root / "images" / last_rel).rename(root / "images" / f"{last_rel}.renamed.png")
    listing[-1] = f"{last_id} {last_rel}.renamed.png"
    (root / "images.txt").write_text("\n".join(listing) + "\n")
    with pytest.raises(TraitsaeError, match=r"(?s)image list: .*changed.*extract.overwrite=true"):
        extract(cfg)


def test_a_resized_image_file_changes_the_image_list(tmp_path, syn_root):
    from traitsae.data.images import load_image_list
    from traitsae.extraction.jobs import make_job

    root = shutil.copytree(syn_root, tmp_path / "syn")
    cfg = compose_extract(tmp_path, ["dataset=cub", f"dataset.root={root}"])
    images = load_image_list(cfg.dataset, cfg.split)
    before = make_job(cfg, images, tmp_path / "a.h5", 0, len(images)).fingerprint
    Path(images.paths[3]).write_bytes(Path(images.paths[4]).read_bytes() + b"\0")
    after = make_job(cfg, images, tmp_path / "a.h5", 0, len(images)).fingerprint
    assert before != after


def test_a_store_from_before_the_image_list_check_is_kept_with_a_warning(
    tmp_path, syn_root, caplog
):
    import json

    import h5py

    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", "split=test"])
    out = extract(cfg)
    with h5py.File(out, "r+") as f:
        old = json.loads(f.attrs["fingerprint"])
        del old["image_list"]
        f.attrs["fingerprint"] = json.dumps(old, sort_keys=True)
    before = out.stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        assert extract(cfg) == out and out.stat().st_mtime_ns == before
    assert "predates the image-list check" in caplog.text


def test_a_store_begun_without_foreground_flags_resumes_and_gets_them(
    tmp_path, reference_store, syn_root, monkeypatch, caplog
):
    """An unfinished store begun by a run without flags (an older traitsae, or rule=none) has
    the same fingerprint: the rerun resumes it, then adds the flags from the images."""
    ref_path, _ = reference_store
    args = [f"dataset.root={syn_root}"]
    _stop_after_first_batch(
        monkeypatch, compose_extract(tmp_path, [*args, "extract.foreground.rule=none"])
    )
    with caplog.at_level("INFO"):
        out = extract(compose_extract(tmp_path, args))
    assert "resuming" in caplog.text and "adding foreground flags" in caplog.text
    with Store(out) as store, Store(ref_path) as ref:
        assert store.foreground_rule == ref.foreground_rule
        assert np.array_equal(store.foreground(), ref.foreground())
