"""A generated museum collection: co-mimic butterfly subspecies photographed with artefacts.

The demo of the collection workflow (docs/guide/collection.md): many contrasts at once,
foreground tokens and the specimen x trait table. Deterministic from `seed`; defaults: 10
subspecies x 60 images of 64 x 64 px (40 train, 20 test).

Design:
- Two species, *erato* and *melpomene*. `RINGS` are mimicry rings: each pairs one erato
  subspecies with one melpomene subspecies that share a wing pattern (base colour, forewing band,
  hindwing bar). In three rings the erato subspecies carries one extra planted trait (`Ring.trait`,
  a small coloured spot at a fixed place on the wing) that its co-mimic lacks; in the other two
  the co-mimics are drawn from the same distribution (no difference).
- Every specimen sits, with a few pixels of jitter and a little size variation, in the centre of
  the frame (inside the central 6 x 6 patches of an 8 x 8 grid) on a uniform light-grey
  background. The outer ring of patches holds the artefacts of a museum photograph: a ruler
  (top or bottom), a specimen label (the other band, at its left or right end) and a colour card
  (left or right edge), each at a random place. The two collections differ by their label paper
  (c1 white, c2 aged cream): a confound outside the specimen, as real collections have.
- Columns of metadata.csv: file, species, subspecies, ring, collection (c1/c2), sex (female/male,
  no dimorphism is drawn: a null column), split (train/test). Collection and sex are balanced
  within every subspecies x split.
- Each planted trait is occluded (not drawn) with probability `p_occlude`; the masks say what
  is drawn.

Files under `root` (the butterflies layout, so the real loader reads it; traitsae.data.images):
  metadata.csv, images/<subspecies>/<name>.png,
  masks/<subspecies>/<name>.png (the layout eval=segments reads: 1 = specimen, 1 + k = planted
  trait k of `TRAITS`; 0 = background and artefacts), mask_classes.txt,
  pairs.csv (`pair,a,b` contrasts for eval=discovery eval.pairs: every ring's co-mimic pair and
  two null pairs within one subspecies, by collection and by sex),
  truth.json (which pairs have a planted difference, and the trait), and `.complete` last
  (generation is atomic: a temporary folder renamed into place).
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from traitsae.data.synthetic import generate_once, write_generated

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Trait:
    name: str
    colour: Colour
    centre: tuple[float, float]  # (dy, dx) from the specimen centre, px at scale 1
    radius: float


@dataclass(frozen=True)
class Ring:
    erato: str  # subspecies names
    melpomene: str
    band: Colour  # forewing band
    bar: Colour | None  # hindwing bar
    trait: int | None  # index into TRAITS: drawn on the erato subspecies only; None = no difference

    @property
    def pair(self) -> str:
        return f"{self.erato}_{self.melpomene}"


TRAITS: tuple[Trait, ...] = (
    Trait("white_hindwing_spot", (240, 240, 235), (11.0, -11.0), 7.0),
    Trait("yellow_forewing_dot", (240, 215, 40), (-11.0, 15.0), 6.5),
    Trait("blue_hindwing_spot", (50, 90, 230), (12.0, 11.0), 7.0),
)
RED, WHITE, YELLOW, ORANGE = (205, 40, 30), (235, 235, 228), (232, 200, 50), (232, 130, 30)
RINGS: tuple[Ring, ...] = (
    Ring("lativita", "malleti", RED, YELLOW, 0),
    Ring("notabilis", "plesseni", WHITE, RED, 1),
    Ring("petiverana", "rosina", RED, None, 2),
    Ring("cyrbia", "cythera", YELLOW, None, None),
    Ring("hydara", "melpomene", ORANGE, WHITE, None),
)
# The null pairs of pairs.csv: one subspecies split by a column without any drawn difference.
NULL_PAIRS = (("lativita", "collection", "c1", "c2"), ("malleti", "sex", "female", "male"))
COLLECTIONS = ("c1", "c2")
LABEL_PAPER: dict[str, Colour] = {"c1": (250, 250, 244), "c2": (226, 204, 150)}
BACKGROUND: Colour = (208, 208, 203)
WING, BODY = (38, 32, 26), (22, 18, 14)
CARD: tuple[Colour, ...] = ((200, 30, 30), (40, 160, 60), (40, 60, 200), (230, 210, 40))
SPECIMEN_CLASS = 1  # mask class of the specimen; planted trait k is class 2 + k
MASKS_DIR, MASK_CLASSES, PAIRS, TRUTH = "masks", "mask_classes.txt", "pairs.csv", "truth.json"
COLUMNS = ("file", "species", "subspecies", "ring", "collection", "sex", "split")


def subspecies_traits() -> dict[str, tuple[str, str, Ring, int | None]]:
    """subspecies -> (species, ring name, ring, planted trait or None)."""
    out = {}
    for ring in RINGS:
        out[ring.erato] = ("erato", ring.pair, ring, ring.trait)
        out[ring.melpomene] = ("melpomene", ring.pair, ring, None)
    return out


# ----------------------------------------------------------------------------- drawing


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _paint(img: np.ndarray, where: np.ndarray, colour: Colour, rng: np.random.Generator) -> None:
    base = np.asarray(colour, np.float32) + rng.normal(0, 6, size=3)
    img[where] = base + rng.normal(0, 5, size=(int(where.sum()), 3))


def draw_specimen(
    img: np.ndarray, ring: Ring, trait: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Draw a butterfly into `img` [H, W, 3] (64 px frame); returns its class-id mask [H, W]."""
    size = img.shape[0]
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / scale
    cy, cx = 32 + rng.uniform(-1.5, 1.5, size=2)
    s = rng.uniform(0.92, 1.0)  # specimen size
    fore = _ellipse(yy, xx, cy - 8 * s, cx - 12 * s, 10 * s, 11 * s) | _ellipse(
        yy, xx, cy - 8 * s, cx + 12 * s, 10 * s, 11 * s
    )
    hind = _ellipse(yy, xx, cy + 9 * s, cx - 10 * s, 9 * s, 10 * s) | _ellipse(
        yy, xx, cy + 9 * s, cx + 10 * s, 9 * s, 10 * s
    )
    body = _ellipse(yy, xx, cy, cx, 16 * s, 2.5 * s)
    _paint(img, fore | hind, WING, rng)
    # A slanted band across each forewing, a horizontal bar across the hindwings.
    band = fore & (np.abs((yy - (cy - 9 * s)) + 0.6 * (np.abs(xx - cx) - 13 * s)) < 3 * s)
    _paint(img, band, ring.band, rng)
    if ring.bar is not None:
        _paint(img, hind & (np.abs(yy - (cy + 8 * s)) < 2.2 * s), ring.bar, rng)
    _paint(img, body, BODY, rng)
    labels = np.where(fore | hind | body, SPECIMEN_CLASS, 0).astype(np.uint8)
    if trait is not None:
        t = TRAITS[trait]
        spot = _ellipse(yy, xx, cy + t.centre[0] * s, cx + t.centre[1] * s, t.radius, t.radius)
        _paint(img, spot, t.colour, rng)
        labels[spot] = SPECIMEN_CLASS + 1 + trait
    return labels


def draw_artefacts(img: np.ndarray, collection: str, rng: np.random.Generator) -> None:
    """Ruler, label and colour card in the outer 7 px of a 64 px frame, at random places."""
    scale = img.shape[0] / 64.0

    def box(y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice]:
        px = [int(np.floor(v * scale + 0.5)) for v in (y0, y1, x0, x1)]
        return slice(px[0], max(px[1], px[0] + 1)), slice(px[2], max(px[3], px[2] + 1))

    ruler_top = rng.random() < 0.5
    y0 = 1 if ruler_top else 57
    x0 = rng.uniform(3, 21)
    img[box(y0, y0 + 5, x0, x0 + 40)] = (245, 245, 240)
    for k, tick in enumerate(np.arange(x0 + 1, x0 + 40, 4)):  # cm ticks, longer every 5th
        img[box(y0, y0 + (4 if k % 5 == 0 else 2), tick, tick + 1)] = (20, 20, 20)
    ly = 58 if ruler_top else 1  # the label takes the other band, at its left or right end
    lx = rng.choice([2.0, 44.0]) + rng.uniform(0, 2)
    img[box(ly, ly + 6, lx, lx + 17)] = LABEL_PAPER[collection]
    for line in (1, 3):  # two lines of handwriting
        length = rng.uniform(8, 15)
        img[box(ly + line, ly + line + 1, lx + 1, lx + 1 + length)] = (40, 40, 50)
    cx0 = 1 if rng.random() < 0.5 else 57  # colour card: four squares down the left/right edge
    cy0 = rng.uniform(10, 28)
    for k, colour in enumerate(CARD):
        img[box(cy0 + 6 * k, cy0 + 6 * k + 5, cx0, cx0 + 5)] = colour


def render(
    ring: Ring, trait: int | None, collection: str, rng: np.random.Generator, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [H, W, 3], uint8 class-id mask [H, W]) of one photographed specimen."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND
    img += rng.normal(0, 3, size=img.shape)
    draw_artefacts(img, collection, rng)
    labels = draw_specimen(img, ring, trait, rng)
    return np.clip(img, 0, 255).astype(np.uint8), labels


# ----------------------------------------------------------------------------- files


def generate(
    root: str | Path,
    seed: int = 0,
    images_per_subspecies: int = 60,
    size: int = 64,
    p_occlude: float = 0.05,
) -> Path:
    """Write the collection to `root` (atomically); see the module docstring for the design."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])

    def fill(tmp: Path) -> None:
        rows = []
        for subspecies, (species, ring_name, ring, trait) in subspecies_traits().items():
            rows += _write_subspecies(
                tmp, subspecies, species, ring_name, ring, trait, images_per_subspecies, size,
                p_occlude, rng,
            )  # fmt: skip
        _write_csv(tmp / "metadata.csv", COLUMNS, rows)
        classes = ["specimen", *(t.name for t in TRAITS)]
        (tmp / MASK_CLASSES).write_text(
            "".join(f"{i} {name}\n" for i, name in enumerate(classes, start=1))
        )
        _write_pairs(tmp)

    return write_generated(root, seed, fill)


def _write_subspecies(
    out: Path,
    subspecies: str,
    species: str,
    ring_name: str,
    ring: Ring,
    trait: int | None,
    n: int,
    size: int,
    p_occlude: float,
    rng: np.random.Generator,
) -> list[list[str]]:
    (out / "images" / subspecies).mkdir(parents=True)
    (out / MASKS_DIR / subspecies).mkdir(parents=True)
    split = np.where(np.arange(n) % 3 == 2, "test", "train")
    collection, sex = np.empty(n, object), np.empty(n, object)
    for part in ("train", "test"):  # balanced within the subspecies x split, shuffled
        idx = np.flatnonzero(split == part)
        collection[idx] = rng.permutation(np.resize(COLLECTIONS, len(idx)))
        sex[idx] = rng.permutation(np.resize(("female", "male"), len(idx)))
    rows = []
    for j in range(n):
        shown = trait if trait is not None and rng.random() >= p_occlude else None
        img, labels = render(ring, shown, str(collection[j]), rng, size)
        rel = f"{subspecies}/{subspecies}_{j + 1:04d}.png"
        Image.fromarray(img).save(out / "images" / rel)
        Image.fromarray(labels).save(out / MASKS_DIR / rel)
        rows.append(
            [f"images/{rel}", species, subspecies, ring_name, collection[j], sex[j], split[j]]
        )
    return rows


def pair_rows() -> list[dict[str, str | None]]:
    """Every contrast of pairs.csv: pair, a, b (filters), kind (`planted`: the co-mimics differ
    by `trait`; `mimic`: co-mimics without a difference; `null`: one subspecies split by a column
    without a drawn difference), trait (name or None)."""
    rows: list[dict[str, str | None]] = []
    for ring in RINGS:
        trait = None if ring.trait is None else TRAITS[ring.trait].name
        a, b = f"subspecies={ring.erato}", f"subspecies={ring.melpomene}"
        kind = "mimic" if trait is None else "planted"
        rows.append({"pair": ring.pair, "a": a, "b": b, "kind": kind, "trait": trait})
    for subspecies, column, a, b in NULL_PAIRS:
        rows.append(
            {
                "pair": f"{subspecies}_{column}",
                "a": f"subspecies={subspecies};{column}={a}",
                "b": f"subspecies={subspecies};{column}={b}",
                "kind": "null",
                "trait": None,
            }
        )
    return rows


def _write_pairs(out: Path) -> None:
    rows = pair_rows()
    _write_csv(out / PAIRS, ("pair", "a", "b"), [[r["pair"], r["a"], r["b"]] for r in rows])
    truth = {
        "pairs": {r["pair"]: {k: v for k, v in r.items() if k != "pair"} for r in rows},
        "traits": {t.name: {"class_id": SPECIMEN_CLASS + 1 + k} for k, t in enumerate(TRAITS)},
        "specimen_class": SPECIMEN_CLASS,
    }
    (out / TRUTH).write_text(json.dumps(truth, indent=2) + "\n")


def _write_csv(path: Path, header: tuple[str, ...], rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def ensure_collection(root: str | Path, seed: int = 0, **kwargs: int | float) -> Path:
    """Generate the collection at `root` unless a complete one is there (once, under a lock)."""
    root = Path(root)
    return generate_once(root, lambda: generate(root, seed=seed, **kwargs), "collection")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the generated collection dataset.")
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(generate(args.root, seed=args.seed))


if __name__ == "__main__":
    main()
