"""The README's settings table, made from the declarations: ``python -m vespa.config --readme``
rewrites it between its markers, and tests/test_config.py fails while it is out of date."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .settings import DECLARATIONS, REPO_ROOT, Setting

README = REPO_ROOT / "README.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"


def settings_table(declarations: Iterable[Setting] = DECLARATIONS) -> str:
    """One Markdown row per declared variable, in declaration order."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| {_variable(s)} | {_default(s)} | {_cell(s.doc)} |" for s in declarations]
    return "\n".join(rows)


def _variable(setting: Setting) -> str:
    return f"`{setting.variable}`" + (f" (Vast: `{setting.vast}`)" if setting.vast else "")


def _default(setting: Setting) -> str:
    if setting.shown is not None:
        return setting.shown
    value = setting.default
    if value is None or value == "" or value == ():
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def with_table(readme: str) -> str:
    """``readme`` with the block between the markers replaced by the current table."""
    before, start, rest = readme.partition(START)
    _, end, after = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the README has no {START} ... {END} block")
    return f"{before}{START}\n{settings_table()}\n{END}{after}"


def rewrite(path: Path = README) -> bool:
    """Bring the table in ``path`` up to date; True when it changed."""
    current = path.read_text(encoding="utf-8")
    updated = with_table(current)
    if updated != current:
        path.write_text(updated, encoding="utf-8")
    return updated != current
