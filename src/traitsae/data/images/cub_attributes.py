"""CUB-200-2011 attribute annotations: `attributes.txt` and `attributes/image_attribute_labels.txt`.

image_attribute_labels.txt has one line per (image, attribute):
`<image_id> <attribute_id> <is_present> <certainty_id> <time>`; some lines of the official file
carry extra fields, so only the first four are read. Certainty ids: 1 not visible, 2 guessing,
3 probably, 4 definitely. A trait is present for an image when is_present = 1 and its certainty
is in the accepted set (default {3, 4}).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traitsae.errors import TraitsaeError

LABELS_FILE = Path("attributes") / "image_attribute_labels.txt"
# The official archive keeps attributes.txt next to CUB_200_2011/, some copies inside it.
NAMES_CANDIDATES = (Path("attributes.txt"), Path("attributes") / "attributes.txt")


@dataclass(frozen=True)
class CubAttributes:
    names: list[str]  # [T] attribute names, attribute id t + 1 at position t
    is_present_IT: np.ndarray  # [max image id + 1, T] bool, row = CUB image id
    certainty_IT: np.ndarray  # [max image id + 1, T] int8, 0 = no line for this pair
    annotated_I: np.ndarray  # [max image id + 1] bool, image id has at least one line

    @property
    def n_traits(self) -> int:
        return len(self.names)

    def labels(
        self, image_ids: Iterable[int | str], certainties: Sequence[int] = (3, 4)
    ) -> np.ndarray:
        """0/1 trait labels [N, T] (bool) for the given CUB image ids, in that order."""
        ids_N = _parse_ids(image_ids)
        in_range = ids_N < self.annotated_I.shape[0]
        known_N = np.zeros_like(in_range)
        known_N[in_range] = self.annotated_I[ids_N[in_range]]
        if not known_N.all():
            missing = ids_N[~known_N][:5].tolist()
            raise TraitsaeError(
                f"{int((~known_N).sum())} images (CUB ids {missing}...) have no line in "
                f"{LABELS_FILE}; the store and the attribute files come from different datasets. "
                "Re-extract the store from the same dataset.root."
            )
        accepted_IT = np.isin(self.certainty_IT[ids_N], np.asarray(list(certainties)))
        return self.is_present_IT[ids_N] & accepted_IT


def _parse_ids(image_ids: Iterable[int | str]) -> np.ndarray:
    try:
        ids_N = np.asarray([int(i) for i in image_ids], dtype=np.int64)
    except ValueError as err:
        raise TraitsaeError(
            f"the store's images/image_id column must hold CUB image ids (integers): {err}."
        ) from None
    if (ids_N < 0).any():
        raise TraitsaeError("the store's images/image_id column holds negative CUB image ids.")
    return ids_N


def find_attribute_names(root: str | Path) -> Path:
    """Path of attributes.txt under (or next to) a CUB root; TraitsaeError if absent."""
    root = Path(root)
    candidates = [root / c for c in NAMES_CANDIDATES] + [root.parent / "attributes.txt"]
    for path in candidates:
        if path.is_file():
            return path
    raise TraitsaeError(
        f"CUB attribute names not found: looked for {', '.join(map(str, candidates))}. "
        "Point dataset.root at the CUB_200_2011 directory (attributes.txt ships with the archive)."
    )


def read_attribute_names(path: str | Path) -> list[str]:
    """`<id> <name>` lines, ids 1..T in order."""
    path = Path(path)
    names: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) != len(names) + 1:
            raise TraitsaeError(
                f"{path}, line {lineno}: expected '<attribute id> <name>' with ids counting up "
                f"from 1 (next id {len(names) + 1}), got {line!r}."
            )
        names.append(fields[1].strip())
    if not names:
        raise TraitsaeError(f"{path} lists no attributes.")
    return names


def read_image_attribute_labels(
    path: str | Path, n_traits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse image_attribute_labels.txt into (is_present_IT, certainty_IT, annotated_I)."""
    path = Path(path)
    if not path.is_file():
        raise TraitsaeError(
            f"CUB attribute labels not found at {path}; dataset.root must be a CUB-200-2011 "
            f"directory holding {LABELS_FILE}."
        )
    rows_L4 = _read_label_rows(path)
    image_L, attr_L, present_L, certainty_L = rows_L4.T
    bad = np.flatnonzero(
        (attr_L < 1) | (attr_L > n_traits) | (image_L < 1) | ~np.isin(present_L, (0, 1))
    )
    bad = np.union1d(bad, np.flatnonzero((certainty_L < 1) | (certainty_L > 4)))
    if bad.size:
        line = _nth_data_line(path, int(bad[0]))
        raise TraitsaeError(
            f"{path}, line {line[0]}: expected image id >= 1, attribute id in 1..{n_traits}, "
            f"is_present in {{0, 1}} and certainty in 1..4, got {line[1]!r}."
        )
    n_rows = int(image_L.max()) + 1
    is_present_IT = np.zeros((n_rows, n_traits), dtype=bool)
    certainty_IT = np.zeros((n_rows, n_traits), dtype=np.int8)
    is_present_IT[image_L, attr_L - 1] = present_L == 1
    certainty_IT[image_L, attr_L - 1] = certainty_L
    annotated_I = np.zeros(n_rows, dtype=bool)
    annotated_I[image_L] = True
    return is_present_IT, certainty_IT, annotated_I


def _read_label_rows(path: Path) -> np.ndarray:
    """First four integer fields of every non-blank line, [L, 4] int64; errors name the line."""
    rows: list[tuple[int, int, int, int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                rows.append((int(fields[0]), int(fields[1]), int(fields[2]), int(fields[3])))
            except (ValueError, IndexError):
                raise TraitsaeError(
                    f"{path}, line {lineno}: expected '<image id> <attribute id> <is_present> "
                    f"<certainty id> [time ...]' (integers first), got {line.rstrip()!r}."
                ) from None
    if not rows:
        raise TraitsaeError(f"{path} holds no attribute labels.")
    return np.asarray(rows, dtype=np.int64)


def _nth_data_line(path: Path, index: int) -> tuple[int, str]:
    """(line number, text) of the index-th non-blank line, for error messages."""
    seen = -1
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return lineno, line.rstrip()
    return -1, ""


def load_cub_attributes(root: str | Path) -> CubAttributes:
    """Read a CUB-200-2011 root's attribute names and per-image labels."""
    root = Path(root)
    if not root.is_dir():
        raise TraitsaeError(
            f"dataset.root={root} is not a directory; point it at the CUB_200_2011 directory."
        )
    names = read_attribute_names(find_attribute_names(root))
    is_present_IT, certainty_IT, annotated_I = read_image_attribute_labels(
        root / LABELS_FILE, len(names)
    )
    return CubAttributes(names, is_present_IT, certainty_IT, annotated_I)
