"""One table of the report: columns in the order they first appear, up to a fixed width
(further fields share one last column), and rows of cells already cut to text."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.answer.report.caps import COLUMN_CAP
from service.answer.report.cells import cut

MORE = "\x00more"  # the column that holds a row's fields beyond COLUMN_CAP


@dataclass
class Table:
    title: str
    intro: str
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    total: int = 0  # rows found, kept or not
    sort_by_time: bool = False

    def add(self, row: dict[str, str]) -> int:
        """Keep one row; the characters it holds (counted against the report's budget)."""
        columns = self.columns
        for name in row:
            if name not in columns and len(columns) < COLUMN_CAP - 1:
                columns.append(name)
        extra = [name for name in row if name not in columns]
        if extra:  # a table keeps its width: further fields share one last column
            kept = {name: cell for name, cell in row.items() if name in columns}
            kept[MORE] = cut("; ".join(f"{name}: {row[name]}" for name in extra))
            row = kept
            if MORE not in columns:
                columns.append(MORE)
        self.rows.append(row)
        return sum(len(name) + len(cell) for name, cell in row.items())
