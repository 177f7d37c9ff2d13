"""ActivationsDataModule: store discovery, sharding (exactly once per epoch), validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from train_helpers import id_store

from traitsae.data import rings
from traitsae.data import stream as stream_module
from traitsae.data.datamodule import ActivationsDataModule
from traitsae.data.read_buffers import MappedBuffer, ReadBuffer, locate_images
from traitsae.data.rings import iter_batches
from traitsae.data.store import create_store
from traitsae.data.stream import ActivationStream, plan_blocks
from traitsae.errors import TraitsaeError

N_IMAGES, N_PATCHES = 64, 4


DM_ARGS = dict(
    backbone="tiny",
    dataset="synthetic",
    split="train",
    layer=-1,
    tokens="patches",
    batch_size=8,
    num_workers=2,
    buffer_vectors=32,
    val_fraction=0.125,
    val_batch_size=None,
    scale_sample=64,
    seed=0,
    allow_incomplete=False,
    block_images=2,
)


def make_dm(store: Path | None, prepare: bool = True, **kwargs) -> ActivationsDataModule:
    args = {**DM_ARGS, "activations_dir": str(store.parent) if store else "", "store": store}
    args.update(kwargs)
    args["store"] = None if args["store"] is None else str(args["store"])
    dm = ActivationsDataModule(**args)
    if prepare:
        dm.prepare()
    return dm


def vector_ids(batch: torch.Tensor) -> list[int]:
    """Patch vector (i, p) carries i and p in its first two entries."""
    return (batch[:, 0].long() * N_PATCHES + batch[:, 1].long()).tolist()


def epoch_ids(
    dm: ActivationsDataModule, world: int, workers: int, epochs: int = 1, plain: bool = False
) -> list[int]:
    """Every id yielded by `world` simulated ranks x `workers` DataLoader workers, through the
    training loader (shared output rings) or, `plain`, a plain DataLoader (pieces as tensors)."""
    ids: list[int] = []
    dm.num_workers = workers
    for rank in range(world):
        stream = ActivationStream(
            dm.train_plan, dm.batch_size, dm.buffer_vectors, dm.seed,
            epochs=epochs, rank=rank, world_size=world,
        )  # fmt: skip
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        batches = list(iter_batches(loader, dm.batch_size) if plain else dm.loader(stream))
        assert all(b.dtype == torch.float16 for b in batches)  # cast on the device, not here
        # Every batch is full but at most one per stream (a finite stream ends ragged).
        assert sum(len(b) != dm.batch_size for b in batches) <= max(1, workers)
        ids += [i for b in batches for i in vector_ids(b)]
    return ids


def image_ids(plan_blocks_: tuple[tuple[int, int], ...]) -> set[int]:
    return {i for start, stop in plan_blocks_ for i in range(start, stop)}


def test_every_vector_exactly_once_per_epoch_over_ranks_and_workers(tmp_path: Path) -> None:
    dm = make_dm(id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES, invalid=(5,)))
    train_images = image_ids(dm.train_plan.blocks) - {5}
    expected = sorted(i * N_PATCHES + p for i in train_images for p in range(N_PATCHES))
    assert dm.n_train_vectors == len(expected)

    ids = epoch_ids(dm, world=2, workers=2, epochs=2)
    first, second = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    assert sorted(ids) == sorted(expected * 2)  # twice in two epochs, invalid image 5 skipped
    assert first != second  # and each epoch is shuffled anew

    one_epoch = epoch_ids(dm, world=2, workers=2)
    assert sorted(one_epoch) == expected
    assert one_epoch != sorted(one_epoch)  # shuffled, not sequential
    assert sorted(epoch_ids(dm, world=2, workers=2, plain=True)) == expected


def foreground_store(path: Path, gzip: bool = False) -> tuple[Path, np.ndarray]:
    """An id store with random foreground flags, one image without any (7) and invalid image 5
    flagged (its flags must not count); `gzip`: patches/3 compressed, so HDF5 reads it."""
    import h5py

    flags_NP = np.random.default_rng(1).random((N_IMAGES, N_PATCHES)) < 0.5
    flags_NP[7], flags_NP[5] = False, True
    path = id_store(path, N_IMAGES, N_PATCHES, invalid=(5,), foreground=flags_NP)
    if gzip:
        with h5py.File(path, "a") as f:
            acts = f["patches/3"][()]
            del f["patches/3"]
            f.create_dataset("patches/3", data=acts, chunks=(4, N_PATCHES, 8), compression="gzip")
    flags_NP[5] = False
    return path, flags_NP


@pytest.mark.parametrize("gzip", [False, True], ids=["mapped", "hdf5"])
def test_every_foreground_vector_exactly_once_per_epoch_over_ranks_and_workers(
    tmp_path: Path, gzip: bool
) -> None:
    path, flags_NP = foreground_store(tmp_path / "s.h5", gzip)
    dm = make_dm(path, tokens="foreground")
    train_images = image_ids(dm.train_plan.blocks)
    expected = sorted(
        i * N_PATCHES + p for i in train_images for p in range(N_PATCHES) if flags_NP[i, p]
    )
    assert dm.n_train_vectors == len(expected) and dm.describe()["foreground"]
    ids = epoch_ids(dm, world=2, workers=2, epochs=2)
    assert sorted(ids) == sorted(expected * 2)  # background and invalid image 5 never read
    assert ids[: len(ids) // 2] != ids[len(ids) // 2 :]
    assert sorted(epoch_ids(dm, world=2, workers=2, plain=True)) == expected
    assert sorted(epoch_ids(dm, world=1, workers=0)) == expected
    assert dm.train_plan.blocks + dm.val_plan.blocks  # and whole images held out as before
    val_ids = {i for a, b in dm.val_plan.blocks for i in range(a, b)}
    assert not val_ids & train_images


def test_foreground_tokens_on_a_store_without_flags_name_the_extract_option(
    tmp_path: Path,
) -> None:
    path = id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES)
    with pytest.raises(TraitsaeError, match=r"(?s)no foreground flags.*rerun the extract.py "
                       r"command.*extract.foreground.rule.*data.tokens=patches"):  # fmt: skip
        make_dm(path, tokens="foreground")
    empty = id_store(tmp_path / "e.h5", 8, N_PATCHES, foreground=np.zeros((8, N_PATCHES), bool))
    with pytest.raises(TraitsaeError, match="no valid training vectors .foreground patches"):
        make_dm(empty, tokens="foreground", num_workers=0)


def test_hdf5_reads_where_the_file_cannot_be_mapped(tmp_path: Path) -> None:
    import h5py

    acts = np.arange(N_IMAGES * N_PATCHES * 8, dtype=np.float16).reshape(N_IMAGES, N_PATCHES, 8)
    acts[:, :, 0], acts[:, :, 1] = np.arange(N_IMAGES)[:, None], np.arange(N_PATCHES)
    path = id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES)
    with h5py.File(path, "a") as f:  # same data, gzip-compressed: HDF5 must decode it
        del f["patches/3"]
        f.create_dataset("patches/3", data=acts, chunks=(4, N_PATCHES, 8), compression="gzip")
    with h5py.File(path, "r") as f:
        assert locate_images(f["patches/3"]) is None
        assert locate_images(f["patches/1"]) is not None
    dm = make_dm(path)
    assert sorted(epoch_ids(dm, world=1, workers=2)) == sorted(
        i * N_PATCHES + p
        for a, b in dm.train_plan.blocks
        for i in range(a, b)
        for p in range(N_PATCHES)
    )


def test_mapped_vectors_match_hdf5_and_stay_valid_while_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import h5py

    path = id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES)
    with h5py.File(path, "r") as f:
        acts = torch.from_numpy(f["patches/3"][()])
    # One batch per piece: every batch comes from a ring slot that will be rewritten.
    monkeypatch.setattr(stream_module, "PIECE_BYTES", 1)
    # The smallest ring the protocol allows: released slots are rewritten as soon as possible.
    monkeypatch.setattr(rings, "RING_SIZE", rings.PREFETCH + 3)
    dm = make_dm(path, buffer_vectors=16)
    stream = ActivationStream(dm.train_plan, dm.batch_size, dm.buffer_vectors, dm.seed, epochs=3)
    held, n = None, 0
    for batch in dm.loader(stream):
        if held is not None:  # the previous batch (the trainer's lookahead) is untouched
            assert torch.equal(held[0], held[1])
        i, p = batch[:, 0].long(), batch[:, 1].long()
        assert torch.equal(batch, acts[i, p])  # whole vectors, exactly as stored
        held, n = (batch, batch.clone()), n + len(batch)
    assert n == 3 * dm.n_train_vectors


def test_ranks_get_disjoint_shares(tmp_path: Path) -> None:
    dm = make_dm(id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES), num_workers=0)
    shares = []
    for rank in range(2):
        stream = ActivationStream(
            dm.train_plan, dm.batch_size, dm.buffer_vectors, dm.seed,
            epochs=1, rank=rank, world_size=2,
        )  # fmt: skip
        shares.append({i for b in stream for i in vector_ids(b)})
    assert shares[0] and shares[1] and not shares[0] & shares[1]


def test_validation_holds_out_whole_images(tmp_path: Path) -> None:
    dm = make_dm(id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES))
    val_images = image_ids(dm.val_plan.blocks)
    assert val_images and not val_images & image_ids(dm.train_plan.blocks)
    seen = [i for batch in dm.val_dataloader() for i in vector_ids(batch)]
    assert sorted(seen) == sorted(i * N_PATCHES + p for i in val_images for p in range(N_PATCHES))
    train_seen = {i // N_PATCHES for i in epoch_ids(dm, 1, 0)}
    assert not train_seen & val_images  # no patch of a validation image is trained on


def test_scale_normalises_mean_squared_norm_to_d_model(tmp_path: Path) -> None:
    dm = make_dm(id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES, d_model=8), scale_sample=1024)
    x = torch.from_numpy(dm.sample).double() * dm.scale
    assert x.pow(2).sum(1).mean().item() == pytest.approx(8.0, rel=1e-6)
    assert dm.describe()["layer"] == 3  # -1 resolved against depth 4


def test_cls_tokens_and_explicit_layer(tmp_path: Path) -> None:
    dm = make_dm(id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES), tokens="cls", layer=1)
    assert dm.layer == 1 and dm.train_plan.key == "cls/1"
    ids = epoch_ids(dm, 1, 0)
    assert len(ids) == dm.n_train_vectors == len(image_ids(dm.train_plan.blocks))


@pytest.mark.parametrize("mapped", [True, False])
def test_buffer_bounds_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    assert len(plan_blocks(n_images=1000, chunk_images=16)) >= 32
    dm = make_dm(id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES), num_workers=0)
    if not mapped:
        monkeypatch.setattr(MappedBuffer, "open", classmethod(lambda cls, *args: None))
    shuffled_at_once: list[int] = []
    buffer_type = MappedBuffer if mapped else ReadBuffer
    gather = buffer_type.gather

    def spy(self, rows, out_ND):
        shuffled_at_once.append(self.n_rows)
        assert self.capacity <= 32 + 2 * N_PATCHES  # buffer + one block (2 images), never more
        return gather(self, rows, out_ND)

    monkeypatch.setattr(buffer_type, "gather", spy)
    assert len(epoch_ids(dm, 1, 0)) == dm.n_train_vectors > 32
    assert len(shuffled_at_once) > 3 and max(shuffled_at_once) < 32 + 2 * N_PATCHES


def test_missing_store_prints_extract_command(tmp_path: Path) -> None:
    dm = make_dm(
        None, False, activations_dir=str(tmp_path / "acts"), backbone="dinov2", dataset="cub"
    )
    with pytest.raises(TraitsaeError) as err:
        dm.prepare()
    msg = str(err.value)
    assert str(tmp_path / "acts" / "cub" / "train" / "dinov2.h5") in msg
    assert "python extract.py backbone=dinov2 dataset=cub split=train" in msg


def test_incomplete_store_refused_unless_asked(tmp_path: Path) -> None:
    final = tmp_path / "acts" / "synthetic" / "train" / "tiny.h5"
    acts = np.zeros((N_IMAGES, N_PATCHES, 8), dtype=np.float16)
    acts[:, :, 0] = np.arange(N_IMAGES)[:, None]
    done = np.arange(N_IMAGES) < 40  # extraction stopped after 40 images
    create_store(
        final.with_name("tiny.h5.tmp"),
        patches={3: acts},
        cls={3: acts[:, 0]},
        images={"path": np.array(["x.jpg"] * N_IMAGES), "done": done},
        attrs={"backbone": "tiny", "dataset": "synthetic", "split": "train", "complete": False},
    )
    kwargs = dict(activations_dir=str(tmp_path / "acts"), block_images=None)
    with pytest.raises(TraitsaeError, match=r"(?s)incomplete.*extract.py.*allow_incomplete"):
        make_dm(None, **kwargs)
    dm = make_dm(None, **kwargs, allow_incomplete=True, scale_sample=16, val_fraction=0)
    assert dm.store_path.name == "tiny.h5.tmp"
    assert dm.n_train_vectors == 40 * N_PATCHES  # only the rows extraction finished


def test_layer_and_width_errors(tmp_path: Path) -> None:
    store = id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES, layers=(1, 3))
    with pytest.raises(TraitsaeError, match=r"layer 2 .*holds layers \[1, 3\]"):
        make_dm(store, layer=2)
    with pytest.raises(TraitsaeError, match="tokens"):
        make_dm(store, tokens="registers")


def test_endless_stream_keeps_epochs_apart_even_with_a_huge_buffer(tmp_path: Path) -> None:
    dm = make_dm(id_store(tmp_path / "s.h5", N_IMAGES, N_PATCHES), buffer_vectors=10**6)
    stream = dm.train_dataset()  # epochs=None, start_batch=0: what training iterates
    n_train, ids = dm.n_train_vectors, []
    for batch in iter_batches(stream, dm.batch_size):
        assert len(batch) == dm.batch_size  # endless: batches straddle epochs, never ragged
        ids += vector_ids(batch)
        if len(ids) >= 3 * n_train:
            break
    epochs = [ids[e * n_train : (e + 1) * n_train] for e in range(3)]
    for epoch in epochs:  # positions [e n, (e + 1) n) are epoch e: every vector exactly once
        assert len(set(epoch)) == n_train
    assert epochs[0] != epochs[1]  # in a new order


@pytest.mark.parametrize("tokens", ["patches", "foreground"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_started_at_batch_g_continues_the_uninterrupted_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, tokens: str
) -> None:
    """Resume = start at the checkpoint's batch: the same batches, in the same order, as the
    uninterrupted stream from there on (pieces of 3 batches, so g falls inside a piece and the
    rank's pieces alternate between the two workers)."""
    monkeypatch.setattr(stream_module, "PIECE_BYTES", 3 * 8 * 8 * 2)
    path = foreground_store(tmp_path / "s.h5")[0]
    dm = make_dm(path, num_workers=workers, tokens=tokens)

    def batches(start: int, n: int, rank: int = 0) -> list[list[int]]:
        stream = ActivationStream(
            dm.train_plan, dm.batch_size, dm.buffer_vectors, dm.seed,
            rank=rank, world_size=2, start_batch=start,
        )  # fmt: skip
        out = []
        for batch in dm.loader(stream):
            out.append(vector_ids(batch))
            if len(out) == n:
                return out
        raise AssertionError("an endless stream ended")

    whole = batches(0, 40)
    for start in (7, 17):  # inside a piece (on the second worker), past an epoch (~13 batches)
        assert batches(start, 40 - start) == whole[start:]
    assert batches(7, 5, rank=1) == batches(0, 12, rank=1)[7:]
