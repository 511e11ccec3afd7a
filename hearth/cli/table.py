"""Plain-text tables for list output."""

from __future__ import annotations

import shutil


def print_table(headers: list[str], rows: list[list[str]], max_col: int = 60) -> None:
    """Print rows under headers, columns padded; long cells are cut with '…'."""
    cells = [[c if len(c) <= max_col else c[: max_col - 1] + "…" for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    width = shutil.get_terminal_size((200, 20)).columns
    for row in [headers, *cells]:
        line = "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
        print(line[:width] if len(line) > width else line)
