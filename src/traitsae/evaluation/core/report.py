"""Static HTML reports that open straight from disk (no server, no scripts, no external assets).

A report is a title, a short intro, one ranked summary table and one card per item (a figure and
its numbers). Figure links are relative to the HTML file so the whole output dir can be copied.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from traitsae.evaluation.core.outputs import replacing

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.card img { max-width: 100%; }
.meta { color: #555; font-size: 0.85em; }
.note { background: #f6f6f6; border-left: 4px solid #999; padding: 0.4em 0.8em; }
"""


@dataclass
class Card:
    """One ranked item: heading, anchor, figure path and a few labelled numbers."""

    heading: str
    anchor: str
    figure: Path | None
    numbers: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


class Section(NamedTuple):
    """A heading, a ranked table (a row's `anchor` links to its card, or its `href` to any
    page, from its `link_column` cell) and the cards below it.

    `note` is a sentence shown under the heading (e.g. why a table is empty); a plain
    (heading, columns, rows, cards) tuple is a Section without a note.
    """

    heading: str
    columns: Sequence[str]
    rows: Sequence[Mapping[str, Any]]
    cards: Sequence[Card]
    note: str = ""


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, float):
        return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _table(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]], link_column: str | None
) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            text = html.escape(format_value(value))
            href = row.get("href") or (f"#{row['anchor']}" if row.get("anchor") else "")
            if c == link_column and href:
                text = f'<a href="{html.escape(str(href))}">{text}</a>'
            css = ' class="text"' if isinstance(value, str) else ""
            cells.append(f"<td{css}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _card(card: Card, html_dir: Path) -> str:
    numbers = " · ".join(
        f"{html.escape(k)} = {html.escape(format_value(v))}" for k, v in card.numbers.items()
    )
    parts = [
        f'<div class="card" id="{html.escape(card.anchor)}">',
        f"<h3>{html.escape(card.heading)}</h3>",
        f'<p class="meta">{numbers}</p>',
    ]
    if card.note:
        parts.append(f'<p class="meta">{html.escape(card.note)}</p>')
    if card.figure is not None:
        src = Path(os.path.relpath(card.figure, html_dir)).as_posix()
        parts.append(f'<img src="{html.escape(src)}" alt="{html.escape(card.heading)}">')
    parts.append("</div>")
    return "\n".join(parts)


def write_report(
    path: Path,
    title: str,
    intro: str,
    sections: Sequence[Section | tuple],
    link_column: str | None = None,
) -> Path:
    """Write `path` with, per section, a heading, its note, a ranked table and the cards."""
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for section in (Section(*s) for s in sections):
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.note:
            body.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.rows:
            body.append(_table(section.columns, section.rows, link_column))
        elif not section.note:
            body.append("<p>(nothing to show)</p>")
        body.extend(_card(card, path.parent) for card in section.cards)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, encoding="utf-8") as f:
        f.write(page)
    return path
