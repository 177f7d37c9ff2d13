"""The embedded demo dataset: synthetic "birds" with planted, localised traits, in the CUB layout.

Design (deterministic from `seed`; defaults: 12 species x 24 images of 64 x 64 px, half train):
- Every image is a brown elliptic body on a noisy, smoothly tinted background.
- `TRAITS` are 8 binary traits, each a coloured shape at a fixed place on the body (a red crown
  spot, a blue wing band, yellow tail stripes, ...), drawn with a few pixels of positional jitter
  and slight colour jitter. Their exact pixels are saved as per-image trait masks.
- A species is a set of traits. Species 1 (`ALPHA`) and species 2 (`BETA`) are the *contrast pair*
  for the discovery test: they share the wing band and the breast spot and differ by exactly one
  trait, `CONTRAST_TRAIT` (the red crown spot: present in Alpha, absent in Beta). The other
  species get distinct random sets of 2-4 traits.
- An image shows its species' traits, except that each trait is occluded (not drawn) with
  probability `p_occlude`; its annotations describe what is drawn (is_present, certainty 4 =
  definitely), except that a fraction `p_label_noise` of the annotations are flipped and marked
  certainty 2 (guessing) -- the label noise real annotators produce. Masks are the ground truth.

Files written under `root` (the CUB-200-2011 layout, so the real `cub` loader reads it):
  images/<class>/<name>.png, images.txt, classes.txt, image_class_labels.txt,
  train_test_split.txt, attributes.txt, attributes/certainties.txt,
  attributes/image_attribute_labels.txt (`<image_id> <attr_id> <is_present> <certainty_id> <time>`),
  trait_masks.npz (`image_ids` int64 [N], `masks` bool [N, T, H, W] in image pixels),
  the same masks in the Fish-Vista-like layout that `eval=segments` reads
  (`traitsae.data.images.masks`): masks/<class>/<name>.png (pixel = trait index + 1 where the
  trait is visible, 0 elsewhere; a later trait drawn over an earlier one wins, as in the image)
  with mask_classes.txt (`<id> <trait name>`), and `.complete` last (generation is atomic: a temporary folder renamed into place).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from traitsae.data.tables import read_table
from traitsae.errors import TraitsaeError

Painter = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]  # (yy, xx, dy, dx) -> mask


@dataclass(frozen=True)
class Trait:
    name: str  # CUB-style attribute name
    colour: tuple[int, int, int]
    paint: Painter  # boolean mask of the shape in a 64 x 64 frame, shifted by (dy, dx)


def _disc(cy: float, cx: float, r: float) -> Painter:
    return lambda yy, xx, dy, dx: (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 <= r**2


def _ring(cy: float, cx: float, r_in: float, r_out: float) -> Painter:
    def paint(yy: np.ndarray, xx: np.ndarray, dy: float, dx: float) -> np.ndarray:
        d2 = (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2
        return (d2 >= r_in**2) & (d2 <= r_out**2)

    return paint


def _box(y0: float, y1: float, x0: float, x1: float) -> Painter:
    def paint(yy: np.ndarray, xx: np.ndarray, dy: float, dx: float) -> np.ndarray:
        return (yy >= y0 + dy) & (yy < y1 + dy) & (xx >= x0 + dx) & (xx < x1 + dx)

    return paint


def _stripes(y0: float, y1: float, x0: float, x1: float, period: int) -> Painter:
    box = _box(y0, y1, x0, x1)
    return lambda yy, xx, dy, dx: (
        box(yy, xx, dy, dx) & (((xx - dx).astype(int) % period) < period // 2)
    )


def _dots(cy: float, xs: tuple[float, ...], r: float) -> Painter:
    discs = [_disc(cy, x, r) for x in xs]
    return lambda yy, xx, dy, dx: np.any([d(yy, xx, dy, dx) for d in discs], axis=0)


# Coordinates are for a 64 x 64 frame (scaled for other sizes); the body spans rows ~10-58.
TRAITS: tuple[Trait, ...] = (
    Trait("has_crown_spot::red", (220, 30, 30), _disc(12, 32, 5)),
    Trait("has_wing_band::blue", (40, 70, 230), _box(28, 34, 12, 52)),
    Trait("has_tail_stripes::yellow", (235, 215, 40), _stripes(50, 58, 36, 56, 4)),
    Trait("has_breast_spot::green", (40, 190, 60), _disc(41, 22, 5)),
    Trait("has_eye_ring::white", (245, 245, 245), _ring(19, 43, 2.5, 4.5)),
    Trait("has_belly_bar::black", (15, 15, 15), _box(40, 58, 29, 34)),
    Trait("has_nape_patch::orange", (245, 140, 20), _box(16, 23, 14, 21)),
    Trait("has_tail_dots::purple", (150, 40, 200), _dots(58, (14.0, 22.0), 3)),
)
CONTRAST_TRAIT = 0  # index into TRAITS: the one trait Alpha has and Beta lacks
ALPHA = "001.Alpha_warbler"
BETA = "002.Beta_warbler"
CONTRAST_PAIR = (ALPHA, BETA)
ALPHA_TRAITS = frozenset({0, 1, 3})
BETA_TRAITS = frozenset({1, 3})
GREEK = [
    "Alpha",
    "Beta",
    "Gamma",
    "Delta",
    "Epsilon",
    "Zeta",
    "Eta",
    "Theta",
    "Iota",
    "Kappa",
    "Lambda",
    "Mu",
    "Nu",
    "Xi",
    "Omicron",
    "Pi",
    "Rho",
    "Sigma",
    "Tau",
    "Upsilon",
    "Phi",
    "Chi",
    "Psi",
    "Omega",
]
BODY_COLOUR = np.array([150, 115, 80], dtype=np.float32)
CERTAINTIES = ("not visible", "guessing", "probably", "definitely")
MASKS_DIR = "masks"  # dataset.masks of conf/dataset/synthetic.yaml
MASK_CLASSES = "mask_classes.txt"  # dataset.mask_classes


def species_names(n_species: int) -> list[str]:
    if not 2 <= n_species <= len(GREEK):
        raise TraitsaeError(
            f"synthetic dataset: n_species must be in 2..{len(GREEK)}, got {n_species}."
        )
    return [f"{i + 1:03d}.{GREEK[i]}_warbler" for i in range(n_species)]


def species_traits(n_species: int, seed: int) -> list[frozenset[int]]:
    """Trait set per species: the fixed contrast pair, then distinct random sets of 2-4 traits."""
    rng = np.random.default_rng([seed, 1])
    sets = [ALPHA_TRAITS, BETA_TRAITS]
    while len(sets) < n_species:
        size = int(rng.integers(2, 5))
        candidate = frozenset(int(t) for t in rng.choice(len(TRAITS), size=size, replace=False))
        if candidate not in sets:
            sets.append(candidate)
    return sets


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noisy, smoothly tinted background [H, W, 3] float32."""
    tint_a, tint_b = rng.uniform(60, 200, size=(2, 3))
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    img = tint_a * (1 - ramp) + tint_b * ramp
    img = np.broadcast_to(img, (size, size, 3)).copy()
    return img + rng.normal(0, 14, size=img.shape)


def render_image(
    traits_shown: set[int] | frozenset[int], rng: np.random.Generator, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image; returns (uint8 image [H, W, 3], bool trait masks [T, H, W])."""
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / scale
    img = _background(rng, size)
    by, bx = rng.normal(0, 1.0, size=2)
    body = ((yy - 34 - by) / 25) ** 2 + ((xx - 32 - bx) / 21) ** 2 <= 1
    img[body] = BODY_COLOUR + rng.normal(0, 10, size=(int(body.sum()), 3))
    masks = np.zeros((len(TRAITS), size, size), dtype=bool)
    for t in sorted(traits_shown):
        dy, dx = rng.uniform(-2.5, 2.5, size=2)
        masks[t] = TRAITS[t].paint(yy, xx, dy, dx)
        colour = np.array(TRAITS[t].colour, dtype=np.float32) + rng.normal(0, 8, size=3)
        img[masks[t]] = colour + rng.normal(0, 6, size=(int(masks[t].sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), masks


def generate(
    root: str | Path,
    seed: int = 0,
    n_species: int = 12,
    images_per_species: int = 24,
    size: int = 64,
    p_occlude: float = 0.05,
    p_label_noise: float = 0.02,
) -> Path:
    """Write the dataset to `root` (atomically); see the module docstring for the design."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    names = species_names(n_species)
    trait_sets = species_traits(n_species, seed)
    return write_generated(
        root,
        seed,
        lambda tmp: _write_all(
            tmp, rng, names, trait_sets, images_per_species, size, p_occlude, p_label_noise
        ),
    )


def write_generated(root: Path, seed: int, fill: Callable[[Path], None]) -> Path:
    """`fill` a temporary folder beside `root`, mark it complete, then rename it over `root`:
    a reader never sees a half-written dataset, and an interrupted run leaves none."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        fill(tmp)
        (tmp / ".complete").write_text(f"seed={seed}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _write_all(
    out: Path,
    rng: np.random.Generator,
    names: list[str],
    trait_sets: list[frozenset[int]],
    per_species: int,
    size: int,
    p_occlude: float,
    p_label_noise: float,
) -> None:
    images, labels, split, attr_lines = [], [], [], []
    ids, rels, all_masks = [], [], []
    image_id = 0
    for class_id, (name, traits) in enumerate(zip(names, trait_sets, strict=True), start=1):
        (out / "images" / name).mkdir(parents=True)
        for j in range(per_species):
            image_id += 1
            shown = {t for t in traits if rng.random() >= p_occlude}
            img, masks = render_image(shown, rng, size)
            rel = f"{name}/{name.split('.', 1)[1]}_{j + 1:04d}.png"
            Image.fromarray(img).save(out / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(j % 2 == 0)}")  # alternate: half train, half test
            attr_lines += _annotations(image_id, shown, rng, p_label_noise)
            ids.append(image_id)
            rels.append(rel)
            all_masks.append(masks)
    _write_lines(out / "images.txt", images)
    _write_lines(out / "image_class_labels.txt", labels)
    _write_lines(out / "train_test_split.txt", split)
    _write_lines(out / "classes.txt", [f"{i} {n}" for i, n in enumerate(names, start=1)])
    _write_lines(out / "attributes.txt", [f"{i} {t.name}" for i, t in enumerate(TRAITS, start=1)])
    (out / "attributes").mkdir()
    _write_lines(
        out / "attributes" / "certainties.txt", [f"{i} {c}" for i, c in enumerate(CERTAINTIES, 1)]
    )
    _write_lines(out / "attributes" / "image_attribute_labels.txt", attr_lines)
    np.savez_compressed(
        out / "trait_masks.npz", image_ids=np.array(ids, dtype=np.int64), masks=np.stack(all_masks)
    )
    _write_label_masks(out, rels, all_masks)


def label_map(masks_THW: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: trait index + 1 per pixel, 0 = background; traits drawn in index order."""
    labels_HW = np.zeros(masks_THW.shape[1:], dtype=np.uint8)
    for t, mask_HW in enumerate(masks_THW):
        labels_HW[mask_HW] = t + 1  # render_image paints in sorted order: the last one shows
    return labels_HW


def _write_label_masks(out: Path, rels: list[str], masks: list[np.ndarray]) -> None:
    """masks/<rel> class-id PNGs and the classes file (the layout eval=segments reads)."""
    _write_lines(out / MASK_CLASSES, [f"{i} {t.name}" for i, t in enumerate(TRAITS, start=1)])
    for rel, masks_THW in zip(rels, masks, strict=True):
        (out / MASKS_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map(masks_THW)).save(out / MASKS_DIR / rel)


def add_label_masks(root: str | Path) -> Path:
    """Write the segmentation-mask layout into a complete dataset generated before it existed.

    The masks come from its trait_masks.npz, so the images (and stores extracted from them) stay
    untouched. The folder appears atomically (written aside, then renamed).
    """
    root = Path(root)
    ids_N, masks_NTHW = load_trait_masks(root)
    rel_of = dict(read_table(root / "images.txt", 2))
    tmp = Path(tempfile.mkdtemp(prefix=".masks.", dir=root))
    try:
        _write_label_masks(tmp, [rel_of[str(int(i))] for i in ids_N], list(masks_NTHW))
        os.replace(tmp / MASK_CLASSES, root / MASK_CLASSES)
        os.replace(tmp / MASKS_DIR, root / MASKS_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _annotations(
    image_id: int, shown: set[int], rng: np.random.Generator, p_noise: float
) -> list[str]:
    """One CUB annotation line per trait; a few are flipped and marked as guesses."""
    lines = []
    for t in range(len(TRAITS)):
        present, certainty = int(t in shown), 4
        if rng.random() < p_noise:
            present, certainty = 1 - present, 2
        lines.append(f"{image_id} {t + 1} {present} {certainty} {float(rng.integers(1, 20)):.1f}")
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def is_generated(root: str | Path) -> bool:
    return (Path(root) / ".complete").is_file()


def ensure_synthetic(root: str | Path, seed: int = 0, **kwargs: int | float) -> Path:
    """Generate the demo dataset at `root` unless a complete one is already there."""
    root = Path(root)

    def make() -> Path:
        if is_generated(root):  # generated before the segmentation masks existed
            return add_label_masks(root)
        return generate(root, seed=seed, **kwargs)

    return generate_once(
        root, make, "synthetic", complete=lambda r: is_generated(r) and (r / MASKS_DIR).is_dir()
    )


def generate_once(
    root: Path,
    make: Callable[[], Path],
    what: str,
    complete: Callable[[Path], bool] = is_generated,
) -> Path:
    """`make()` the generated dataset at `root` unless `complete(root)`, under an exclusive lock
    (`<root>.lock`): jobs that start together (the shards of a Slurm array) generate it once;
    the others wait and then read it (a second `generate` would replace the folder under a
    reader)."""
    if complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        if complete(root):  # made by another job while this one waited
            return root
        if not is_generated(root) and root.exists() and any(root.iterdir()):
            raise TraitsaeError(
                f"{root} exists but holds no complete {what} dataset (no .complete marker); "
                "delete it or point dataset.root at an empty or missing directory."
            )
        return make()


def load_trait_masks(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids int64 [N], masks bool [N, T, H, W]) of a generated synthetic dataset."""
    path = Path(root) / "trait_masks.npz"
    if not path.is_file():
        raise TraitsaeError(
            f"{path} not found: trait masks exist only for the synthetic dataset; generate it "
            "with `python extract.py dataset=synthetic` (or traitsae.data.synthetic.generate)."
        )
    with np.load(path) as data:
        return data["image_ids"], data["masks"]


def patch_coverage(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch covered by each trait: masks [N, T, H, W] -> float32 [N, T, rows, cols].

    Valid when the backbone sees the whole image resized to a multiple of the grid (the `tiny`
    backbone takes the 64 px images as they are: 8 x 8 patches of 8 px).
    """
    n, t, h, w = masks.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise TraitsaeError(
            f"masks of {h} x {w} px do not divide into a {rows} x {cols} patch grid."
        )
    blocks = masks.reshape(n, t, rows, h // rows, cols, w // cols)
    return blocks.mean(axis=(3, 5), dtype=np.float32)


def trait_names() -> list[str]:
    return [t.name for t in TRAITS]


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic CUB-layout demo dataset.")
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(generate(args.root, seed=args.seed))


if __name__ == "__main__":
    main()
