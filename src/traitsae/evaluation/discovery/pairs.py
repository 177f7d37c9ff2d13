"""The contrasts of one discovery run: `eval.group_a`/`eval.group_b` (one pair) or a pairs file,
and what each found (`Discovery`).

    eval.pairs=pairs.csv          # header `pair,a,b`, one contrast per line:
    pair,a,b
    lativita_malleti,subspecies=lativita,subspecies=malleti
    lativita_halves,subspecies=lativita;collection=c1,subspecies=lativita;collection=c2
    erato_melpomene,species=erato,species=melpomene|melpomene_x

A filter is conditions `column=value` joined by `;` (all must hold); `value1|value2` allows
either value. Blank lines and lines starting with `#` are skipped. Pair names name the output
folders (pairs/<name>/), so they are letters, digits, `_`, `-` and `.`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.errors import TraitsaeError
from traitsae.evaluation.discovery.candidates import Candidate, GroupScores, HeatMaps
from traitsae.evaluation.discovery.groups import (
    NOT_GROUPABLE,
    column_listing,
    describe_group,
    group_mask,
    parse_group,
    value_counts,
)
from traitsae.evaluation.discovery.stats import Contrast

PAIR_COLUMNS = ("pair", "a", "b")
_PAIR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_EXAMPLE = (
    "e.g. `lativita_malleti,subspecies=lativita,subspecies=malleti` or, several conditions, "
    "`halves,subspecies=lativita;collection=c1,subspecies=lativita;collection=c2`"
)


@dataclass(frozen=True)
class Pair:
    """One contrast: group A and group B as filters {column: [allowed values]}."""

    name: str
    a: dict[str, list[str]]
    b: dict[str, list[str]]
    where: str = ""  # how messages name its origin, e.g. "pairs.csv line 3"

    def names(self) -> dict[str, str]:
        return {"a": describe_group(self.a), "b": describe_group(self.b)}


def filter_text(group: Mapping[str, list[str]]) -> str:
    """{column: [values]} written as in a pairs file: `column=v1|v2;column2=v`."""
    return ";".join(f"{column}={'|'.join(values)}" for column, values in group.items())


def parse_filter(text: str, where: str) -> dict[str, list[str]]:
    """`subspecies=lativita;collection=c1|c2` -> {"subspecies": ["lativita"], "collection":
    ["c1", "c2"]}; `where` names the file, line and cell in errors."""
    text = text.strip()
    if not text:
        raise TraitsaeError(
            f"{where} is empty: a group needs at least one condition column=value ({_EXAMPLE})."
        )
    group: dict[str, list[str]] = {}
    for condition in text.split(";"):
        column, equals, values = (part.strip() for part in condition.partition("="))
        alternatives = [v.strip() for v in values.split("|")]
        if not equals or not column or not all(alternatives):
            raise TraitsaeError(
                f"{where} = {text!r}: condition {condition.strip()!r} is not column=value. A "
                "filter is conditions column=value joined by ';' (all must hold), with "
                f"value1|value2 for either value ({_EXAMPLE}). Fix that cell."
            )
        if column in group:
            raise TraitsaeError(
                f"{where} = {text!r} names column {column!r} twice; conditions joined by ';' must "
                f"all hold, so write the alternatives as {column}="
                f"{'|'.join([*group[column], *alternatives])}."
            )
        group[column] = alternatives
    return group


def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs of a CSV file (header `pair,a,b`), in file order, checked for form."""
    path = Path(path)
    if not path.is_file():
        raise TraitsaeError(
            f"eval.pairs={path}: no such file. Write a CSV whose header is `pair,a,b` and whose "
            f"lines are one contrast each ({_EXAMPLE}), and pass its path (relative to the "
            "directory you run from)."
        )
    pairs: list[Pair] = []
    first_line: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [cell.strip() for cell in next(reader, [])]
        if tuple(header) != PAIR_COLUMNS:
            raise TraitsaeError(
                f"eval.pairs file {path} line 1 is {','.join(header)!r}, but its header must be "
                f"exactly `pair,a,b` (the pair's name, group A's filter, group B's filter); "
                "unknown or missing columns are not read. Fix the first line."
            )
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue
            where = f"eval.pairs file {path} line {line}"
            if len(cells) != len(PAIR_COLUMNS):
                raise TraitsaeError(
                    f"{where} has {len(cells)} cells ({','.join(cells)!r}), but a line is "
                    f"`pair,a,b`: 3 cells separated by ','. Inside a filter, conditions are "
                    f"joined by ';' ({_EXAMPLE}). Fix the line."
                )
            name = cells[0].strip()
            if not _PAIR_NAME.fullmatch(name):
                raise TraitsaeError(
                    f"{where}: pair name {name!r} is not a folder name; the name names the "
                    "output folder pairs/<name>/, so use letters, digits, '_', '-' and '.', "
                    "starting with a letter or digit."
                )
            if name in first_line:
                raise TraitsaeError(
                    f"{where}: pair name {name!r} is already used on line {first_line[name]}; "
                    "every pair needs its own name (it names its results and its output "
                    "folder). Rename or remove one of the two lines."
                )
            first_line[name] = line
            a, b = (parse_filter(cells[i], f"{where}, column {c}") for i, c in ((1, "a"), (2, "b")))
            pairs.append(Pair(name, a, b, where))
    if not pairs:
        raise TraitsaeError(
            f"eval.pairs file {path} lists no pair: add lines `pair,a,b` below its header "
            f"({_EXAMPLE})."
        )
    return pairs


def configured_pairs(
    pairs_file: Any, group_a: Any, group_b: Any, default: Mapping[str, Any]
) -> tuple[list[Pair], bool]:
    """The run's pairs and whether they come from a file: eval.pairs, or the one pair
    eval.group_a / eval.group_b (default: the dataset's contrast pair)."""
    if pairs_file:
        if group_a or group_b:
            raise TraitsaeError(
                f"eval.pairs={pairs_file} and eval.group_a/eval.group_b were both given; the pairs "
                "file lists every contrast of the run. Drop eval.group_a/eval.group_b, or drop "
                "eval.pairs to run a single pair."
            )
        return read_pairs(str(pairs_file)), True
    specs = {
        "group_a": group_a or default.get("group_a"),
        "group_b": group_b or default.get("group_b"),
    }
    a, b = (parse_group(spec, name) for name, spec in specs.items())
    return [Pair("a_vs_b", a, b)], False


def _check_filter(
    metadata: Mapping[str, np.ndarray], group: Mapping[str, list[str]], where: str, source: str
) -> None:
    """Every column exists and every value is on some valid image (else: a typo)."""
    valid_N = np.asarray(metadata["valid"], dtype=bool)
    for column, allowed in group.items():
        if column not in metadata or column in NOT_GROUPABLE:
            raise TraitsaeError(
                f"{where} filters on column {column!r}, which store {source} does not have. "
                f"Available metadata columns (values with image counts): "
                f"{column_listing(metadata)}. Fix the column name on that line."
            )
        present = set(np.asarray(metadata[column])[valid_N].astype(str))
        absent = [v for v in allowed if v not in present]
        if absent:
            raise TraitsaeError(
                f"{where} asks for {column}={'|'.join(absent)}, which no valid image of store "
                f"{source} has, so the group is empty. Values of {column!r} (with image counts): "
                f"{value_counts(np.asarray(metadata[column])[valid_N])}. Fix the spelling, or "
                "remove the line if this store has no such images."
            )


def pair_masks(
    metadata: Mapping[str, np.ndarray], pair: Pair, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """bool [N] masks of the pair's groups over the store's rows. A pair from a file may select
    no image where its conditions together match none (it is then skipped for its size); a
    column or value the store lacks, or groups that overlap, are errors."""
    if not pair.where:  # eval.group_a / eval.group_b: the single pair's own messages
        mask_a = group_mask(metadata, pair.a, "group_a", source)
        mask_b = group_mask(metadata, pair.b, "group_b", source)
        what = f"eval.group_a={pair.a} and eval.group_b={pair.b} share"
    else:
        for g in ("a", "b"):
            _check_filter(metadata, getattr(pair, g), f"{pair.where}, column {g},", source)
        valid_N = np.asarray(metadata["valid"], dtype=bool)
        mask_a, mask_b = (
            valid_N
            & np.logical_and.reduce(
                [np.isin(np.asarray(metadata[c]).astype(str), v) for c, v in group.items()]
            )
            for group in (pair.a, pair.b)
        )
        what = f"{pair.where} (pair {pair.name!r}): groups a and b share"
    if (overlap := int((mask_a & mask_b).sum())) > 0:
        raise TraitsaeError(
            f"{what} {overlap} images; the groups must be disjoint to contrast them."
        )
    return mask_a, mask_b


@dataclass
class Discovery:
    """Everything eval=discovery found for one pair on one store; nothing is written yet.
    A skipped pair (groups below min_group, no shared stratum) has `skipped` and no result."""

    pair: Pair
    groups: dict[str, Any]
    result: Contrast | None = None
    scores: GroupScores | None = None
    candidates: list[Candidate] = field(default_factory=list)
    maps: HeatMaps = field(default_factory=dict)
    skipped: str = ""

    @property
    def names(self) -> dict[str, str]:
        return self.pair.names()
