"""Plain-text tables of load-generator runs, one row per run, for both load generators."""

from __future__ import annotations

from typing import Any

Column = tuple[str, str, str]  # JSON key, title, format


def table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """Right-aligned columns; a column no row has is left out, a missing cell shows "-"."""
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    cells = [[title for _, title, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(lines)
