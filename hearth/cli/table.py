"""Plain-text tables for list output."""

from __future__ import annotations

import shutil
import sys
import unicodedata


def width(text: str) -> int:
    """Columns `text` takes in a terminal: East Asian wide characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def cut(text: str, columns: int) -> str:
    """`text` in at most `columns` columns, ending in '…' when it was cut."""
    if width(text) <= columns:
        return text
    out, used = [], 0
    for c in text:
        w = width(c)
        if used + w > columns - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def pad(text: str, columns: int) -> str:
    return text + " " * (columns - width(text))


def print_table(headers: list[str], rows: list[list[str]], max_col: int = 60) -> None:
    """Print rows under headers, columns padded; long cells are cut with '…'.

    Lines are fitted to the terminal only when stdout is one: a pipe or file
    gets every column whole.
    """
    cells = [[cut(c, max_col) for c in row] for row in rows]
    widths = [width(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], width(c))
    limit = shutil.get_terminal_size((200, 20)).columns if sys.stdout.isatty() else None
    for row in [headers, *cells]:
        line = "  ".join(pad(c, widths[i]) for i, c in enumerate(row)).rstrip()
        print(cut(line, limit) if limit else line)
