"""The README and the guide pages as a newcomer reads them: two commands, commands that compose,
links that resolve, and the demo's follow-up commands that run as typed."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "guide").glob("*.md"))]
ENTRY_CONFIGS = {
    "extract.py": "extract",
    "train.py": "train",
    "evaluate.py": "evaluate",
    "explore.py": "explore",
}
COMMAND = re.compile(r"^\.venv/bin/python (extract|train|evaluate|explore)\.py\b")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(page: Path) -> list[str]:
    """Each `.venv/bin/python <entry>.py …` command of the page's bash blocks, one line each."""
    found = []
    for block in bash_blocks(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            if COMMAND.match(line.strip()):
                found.append(line.strip())
    return found


def documented() -> list[tuple[str, str]]:
    return [(page.name, cmd) for page in PAGES for cmd in commands(page)]


def overrides_of(argv: list[str]) -> list[str]:
    """The overrides of one job: `-m` dropped, each sweep's first value."""
    args = [a for a in argv if a != "-m"]
    parsed = OverridesParser.create().parse_overrides(args)
    single = []
    for override, arg in zip(parsed, args, strict=True):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            single.append(f"{override.get_key_element()}={first}")
        else:
            single.append(arg)
    return single


def compose_command(line: str):
    """Compose the command's config (`<placeholders>` filled, `sae=<file>` renamed as evaluate.py
    does)."""
    words = shlex.split(re.sub(r"<[^>]*>", "placeholder", line), comments=True)
    script, argv = Path(words[1]).name, words[2:]
    overrides = overrides_of(argv)
    if script == "evaluate.py":
        sys.path.insert(0, str(ROOT))
        try:
            from evaluate import sae_override_as_path
        finally:
            sys.path.remove(str(ROOT))
        overrides = sae_override_as_path(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            return compose(ENTRY_CONFIGS[script], overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_quick_start_is_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = bash_blocks(quick)
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert lines == ["make demo", "make test"]


def test_pages_document_commands() -> None:
    assert len(commands(ROOT / "README.md")) >= 8
    assert documented()


@pytest.mark.parametrize(("page", "line"), documented())
def test_documented_command_composes(page: str, line: str) -> None:
    """Every documented override names a real config group or key (a renamed key fails here)."""
    cfg = compose_command(line)
    assert cfg is not None


def test_relative_links_resolve() -> None:
    missing = []
    for page in [*PAGES, ROOT / "docs" / "ARCHITECTURE.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
