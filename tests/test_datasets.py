"""Image sources: the synthetic demo generator, CUB, butterflies and image-folder loaders."""

from __future__ import annotations

import numpy as np
import pytest
from extract_helpers import compose_extract, small_synthetic
from omegaconf import OmegaConf
from PIL import Image

from traitsae.data import synthetic
from traitsae.data.images import ImageDataset, load_image_list
from traitsae.data.images.cub import load_cub
from traitsae.data.images.cub_attributes import load_cub_attributes
from traitsae.errors import TraitsaeError


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    return small_synthetic(tmp_path_factory.mktemp("syn") / "synthetic")


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, n_species=3, images_per_species=4)
    b = synthetic.generate(tmp_path / "b", seed=3, n_species=3, images_per_species=4)
    c = synthetic.generate(tmp_path / "c", seed=4, n_species=3, images_per_species=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    same = [(a / f).read_bytes() == (b / f).read_bytes() for f in files]
    assert all(same)
    png = files[[str(f).endswith(".png") for f in files].index(True)]
    assert (a / png).read_bytes() != (c / png).read_bytes()


def test_contrast_pair_differs_by_exactly_one_trait():
    sets = synthetic.species_traits(12, seed=0)
    names = synthetic.species_names(12)
    alpha, beta = sets[names.index(synthetic.ALPHA)], sets[names.index(synthetic.BETA)]
    assert alpha - beta == {synthetic.CONTRAST_TRAIT} and beta < alpha and len(beta) >= 1
    assert len(set(sets)) == 12  # species are distinguishable by their trait sets


def test_synthetic_layout_masks_and_annotations(syn_root):
    train, test = load_cub(syn_root, "train"), load_cub(syn_root, "test")
    assert len(train) == len(test) == 16
    assert train.metadata["species"][0] == synthetic.ALPHA and train.labels[0] == 0
    assert train.metadata["image_id"][:2] == ["1", "3"]
    ids, masks = synthetic.load_trait_masks(syn_root)
    assert masks.shape == (32, len(synthetic.TRAITS), 64, 64) and masks.dtype == bool
    attrs = load_cub_attributes(syn_root)
    assert attrs.annotated_I[ids].all() and attrs.annotated_I.sum() == len(ids)
    present, certainty = attrs.is_present_IT[ids], attrs.certainty_IT[ids]  # [N, T]
    drawn = masks.any(axis=(2, 3))  # [N, T]
    sure = certainty == 4
    # Annotations marked "definitely" describe exactly what is drawn; guesses are the label noise.
    np.testing.assert_array_equal(present[sure], drawn[sure])
    assert (present[~sure] != drawn[~sure]).all()
    # The masks are where the trait colour is: red crown pixels of the first Alpha image.
    img = np.asarray(Image.open(train.paths[0]), dtype=np.int16)
    red = masks[0, synthetic.CONTRAST_TRAIT]
    assert red.sum() > 20
    assert np.abs(img[red] - np.array(synthetic.TRAITS[0].colour)).mean() < 30


def test_patch_coverage_locates_traits_on_the_grid(syn_root):
    _, masks = synthetic.load_trait_masks(syn_root)
    cover = synthetic.patch_coverage(masks, (8, 8))  # [N, T, 8, 8]
    assert cover.shape == (32, len(synthetic.TRAITS), 8, 8)
    np.testing.assert_allclose(cover.sum(axis=(2, 3)) * 64, masks.sum(axis=(2, 3)), rtol=1e-5)
    crown = cover[0, synthetic.CONTRAST_TRAIT]  # red crown spot: top centre of the image
    row, col = np.unravel_index(crown.argmax(), crown.shape)
    assert row <= 2 and 2 <= col <= 5
    with pytest.raises(TraitsaeError, match="patch grid"):
        synthetic.patch_coverage(masks, (7, 7))


def test_ensure_synthetic_refuses_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("")
    with pytest.raises(TraitsaeError, match="no complete synthetic dataset"):
        synthetic.ensure_synthetic(tmp_path / "x")
    with pytest.raises(TraitsaeError, match="trait_masks.npz"):
        synthetic.load_trait_masks(tmp_path / "x")


def test_cub_attribute_lines_with_extra_fields(tmp_path, syn_root):
    import shutil

    root = shutil.copytree(syn_root, tmp_path / "cub")
    labels = root / "attributes" / "image_attribute_labels.txt"
    lines = labels.read_text().splitlines()
    lines[0] = lines[0] + " 0 extra"  # the real CUB file has such lines
    labels.write_text("\n".join(lines) + "\n")
    attrs = load_cub_attributes(root)
    assert attrs.is_present_IT[attrs.annotated_I].shape == (32, len(synthetic.TRAITS))
    (root / "train_test_split.txt").unlink()
    with pytest.raises(TraitsaeError, match="train_test_split.txt"):
        load_cub(root, "train")


def test_dataset_configs_compose_and_load(tmp_path, syn_root):
    cfg = compose_extract(tmp_path, ["dataset=cub", f"dataset.root={syn_root}", "split=test"])
    images = load_image_list(cfg.dataset, cfg.split)
    assert len(images) == 16 and set(images.metadata) == {"image_id", "species"}
    for name in ("inat21", "imagenet", "imagefolder", "butterflies", "synthetic"):
        cfg = compose_extract(tmp_path, [f"dataset={name}"])
        assert cfg.dataset.name == name and cfg.dataset.root.startswith(str(tmp_path))
    with pytest.raises(TraitsaeError, match="not a CUB split"):
        load_image_list(
            OmegaConf.create({"name": "cub", "format": "cub", "root": str(syn_root)}), "val"
        )


def _butterflies(tmp_path, csv_text, **overrides):
    root = tmp_path / "bf"
    (root / "img").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (20, 20), (10, 20, 30)).save(root / "img" / name)
    (root / "meta.csv").write_text(csv_text)
    cfg = {
        "name": "butterflies", "format": "butterflies", "root": str(root), "metadata": "meta.csv",
        "file_column": "file", "species_column": "species", "subspecies_column": "subspecies",
        "split_column": "split", "filters": None, "encoding": "utf-8-sig", "strict": False,
        **overrides,
    }  # fmt: skip
    return OmegaConf.create(cfg)


CSV = """file,species,subspecies,view,split,sex
img/a.png,erato,notabilis,dorsal,train,m
img/b.png,melpomene,plesseni,dorsal,train,f
img/c.png,erato,notabilis,ventral,train,m
img/d.png,melpomene,plesseni,dorsal,test,m
"""


def test_butterflies_filters_split_and_metadata(tmp_path):
    cfg = _butterflies(tmp_path, CSV, filters={"view": "dorsal"})
    train = load_image_list(cfg, "train")
    assert [p.rsplit("/", 1)[1] for p in train.paths] == ["a.png", "b.png"]
    assert train.labels.tolist() == [0, 1]
    assert train.metadata["subspecies"] == ["notabilis", "plesseni"]
    assert train.metadata["sex"] == ["m", "f"] and "file" not in train.metadata
    test = load_image_list(cfg, "test")
    assert test.labels.tolist() == [1]  # labels index species of the whole filtered CSV
    listed = load_image_list(
        _butterflies(tmp_path / "2", CSV, filters={"view": ["dorsal", "ventral"]}), "train"
    )
    assert len(listed) == 3


def test_butterflies_without_split_column_and_bad_columns(tmp_path):
    no_split = CSV.replace(",split", "").replace(",train", "").replace(",test", "")
    cfg = _butterflies(tmp_path, no_split)
    assert len(load_image_list(cfg, "train")) == len(load_image_list(cfg, "test")) == 4
    with pytest.raises(TraitsaeError, match="lacks columns"):
        load_image_list(_butterflies(tmp_path / "2", CSV, species_column="taxon"), "train")
    with pytest.raises(TraitsaeError, match="filters names column"):
        load_image_list(_butterflies(tmp_path / "3", CSV, filters={"wing": "fore"}), "train")
    with pytest.raises(TraitsaeError, match="holds no images"):
        load_image_list(_butterflies(tmp_path / "4", CSV, filters={"view": "lateral"}), "train")
    with pytest.raises(TraitsaeError, match="metadata CSV"):
        load_image_list(_butterflies(tmp_path / "5", CSV, metadata="nope.csv"), "train")


def test_imagefolder_splits(tmp_path):
    for split, cls, n in (("train_mini", "cat", 2), ("train_mini", "dog", 1), ("val", "dog", 1)):
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / f"{i}.jpg")
    cfg = OmegaConf.create(
        {"name": "inat21", "format": "imagefolder", "root": str(tmp_path),
         "splits": {"train": "train_mini", "test": "val"}}
    )  # fmt: skip
    train = load_image_list(cfg, "train")
    assert train.labels.tolist() == [0, 0, 1] and train.metadata["species"] == ["cat", "cat", "dog"]
    assert load_image_list(cfg, "test").metadata["species"] == ["dog"]
    with pytest.raises(TraitsaeError, match="not defined"):
        load_image_list(cfg, "holdout")


def test_unreadable_images_are_flagged_not_fatal(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(good)
    bad.write_bytes(b"\x89PNG truncated")
    import torchvision.transforms as T

    ds = ImageDataset([str(good), str(bad), str(tmp_path / "gone.png")], T.ToTensor(), image_size=8)
    assert ds[0]["ok"] and ds[0]["image"].shape == (3, 8, 8)
    for item in (ds[1], ds[2]):
        assert not item["ok"] and item["error"] and float(item["image"].abs().sum()) == 0.0
    assert "FileNotFoundError" in ds[2]["error"]


def test_readme_filters_spelling_composes(tmp_path):
    cfg = _butterflies(tmp_path, CSV)
    composed = compose_extract(
        tmp_path, ["dataset=butterflies", f"dataset.root={cfg.root}", "dataset.metadata=meta.csv",
                   "dataset.filters={view: dorsal}"],
    )  # fmt: skip
    assert [p.rsplit("/", 1)[1] for p in load_image_list(composed.dataset, "train").paths] == [
        "a.png",
        "b.png",
    ]


def test_butterflies_duplicates_and_broken_rows_warn_or_fail(tmp_path, caplog):
    text = (
        CSV + "img/a.png,erato,notabilis,dorsal,train,m\n./img/b.png,melpomene,x,dorsal,train,f\n"
    )
    text += "img/c.png,erato\nimg/d.png,,plesseni,dorsal,train,m\n"  # short row, empty species
    cfg = _butterflies(tmp_path, text)
    with caplog.at_level("WARNING"):
        train = load_image_list(cfg, "train")
    assert [p.rsplit("/", 1)[1] for p in train.paths] == ["a.png", "b.png", "c.png"]
    assert (
        "2 rows whose fields do not match the header" in caplog.text and "lines 8, 9" in caplog.text
    )
    assert "2 rows repeating an image file listed earlier (lines 6, 7" in caplog.text
    cfg.strict = True
    with pytest.raises(TraitsaeError, match=r"2 rows whose fields.*and 2 rows repeating"):
        load_image_list(cfg, "train")


def test_butterflies_csv_encoding(tmp_path):
    cfg = _butterflies(tmp_path, "")
    (tmp_path / "bf" / "meta.csv").write_bytes(
        CSV.replace("notabilis", "notabilé").encode("latin-1")
    )
    with pytest.raises(TraitsaeError, match=r"not utf-8-sig text.*dataset.encoding=latin-1"):
        load_image_list(cfg, "train")
    cfg.encoding = "latin-1"
    assert load_image_list(cfg, "train").metadata["subspecies"][0] == "notabilé"
