"""The per-month chart's geometry, as pure functions: counts per month in, the SVG's
coordinates and labels out (no state, no I/O; the template only draws them).

One row of bars per series, each on its own scale (events outnumber messages many times
over), sharing one time axis: per month over up to four years, per year beyond.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from service.answer.report.dates import MONTH_NAMES

SERIES = (
    ("messages", "Messages sent"),
    ("opens", "Opens"),
    ("clicks", "Clicks"),
    ("events", "Events"),
)
WIDTH = 880  # of the SVG's view box
LEFT = 128  # where the plot starts: the series' names and peaks are left of it
ROW_HEIGHT = 64
ROW_GAP = 18
MONTHS_SPAN = 48  # months drawn one by one; a longer span is drawn per year
YEARS_SHOWN = 60  # the latest years drawn; the month table still lists all
COLOURS = ("#2f5d8a", "#3a8f6b", "#c77d1a", "#7a5ca8")


class Bucket(NamedTuple):
    """One step of the time axis: its label and one count per series (SERIES order)."""

    label: str
    values: list[int]


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float  # 0 for a count of 0 (no bar drawn); at least 1.5 for any other count
    value: int
    label: str  # the bucket's, for the bar's tooltip
    show_value: bool  # few enough bars to write each count above its bar


@dataclass(frozen=True)
class SeriesRow:
    name: str
    colour: str
    top: int
    base: int  # the baseline the bars stand on
    peak: int  # the highest count, the row's scale
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class AxisLabel:
    x: float
    text: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right: int
    axis: int  # the y of the axis labels
    rows: tuple[SeriesRow, ...]
    labels: tuple[AxisLabel, ...]
    per: str  # "month" or "year"


def buckets(months: Mapping[str, Mapping[str, int]]) -> tuple[list[Bucket], str]:
    """The time axis for counts per month ("YYYY-MM" -> series -> count): every month from
    the first to the last, empty ones included, or per year when that is too many."""
    first, last = min(months), max(months)
    y0, m0 = int(first[:4]), int(first[5:])
    y1, m1 = int(last[:4]), int(last[5:])
    span = (y1 - y0) * 12 + m1 - m0 + 1
    if span > MONTHS_SPAN:
        return _year_buckets(months), "year"
    found = []
    for k in range(span):
        year, month = y0 + (m0 - 1 + k) // 12, (m0 - 1 + k) % 12 + 1
        counts = months.get(f"{year:04d}-{month:02d}", {})
        label = MONTH_NAMES[month - 1][:3] + (f" {year}" if k == 0 or month == 1 else "")
        found.append(Bucket(label, [counts.get(s, 0) for s, _ in SERIES]))
    return found, "month"


def _year_buckets(months: Mapping[str, Mapping[str, int]]) -> list[Bucket]:
    years: dict[int, list[int]] = {}
    for name, counts in months.items():
        totals = years.setdefault(int(name[:4]), [0] * len(SERIES))
        for i, (s, _) in enumerate(SERIES):
            totals[i] += counts.get(s, 0)
    shown = sorted(years)[-YEARS_SHOWN:]  # centuries of stray dates: the latest ones
    return [Bucket(str(year), years[year]) for year in shown]


def chart(months: Mapping[str, Mapping[str, int]]) -> Chart | None:
    """The chart for counts per month; None when nothing has a date."""
    if not months:
        return None
    axis_buckets, per = buckets(months)
    n = len(axis_buckets)
    step = (WIDTH - LEFT - 8) / n
    bar = max(2.0, min(36.0, step * 0.7))
    every = max(1, round(n / 12))  # about twelve labels on the axis
    rows = tuple(series_row(i, name, axis_buckets, step, bar) for i, (_, name) in enumerate(SERIES))
    axis = len(SERIES) * (ROW_HEIGHT + ROW_GAP)
    labels = tuple(
        AxisLabel(round(LEFT + step * k + step / 2, 1), label)
        for k, (label, _) in enumerate(axis_buckets)
        if k % every == 0
    )
    return Chart(
        width=WIDTH,
        height=axis + 12,
        left=LEFT,
        right=WIDTH - 8,
        axis=axis - ROW_GAP + 14,
        rows=rows,
        labels=labels,
        per=per,
    )


def series_row(i: int, name: str, axis_buckets: list[Bucket], step: float, bar: float) -> SeriesRow:
    """Row `i` of the chart: the bars of series `i`, scaled to its own peak."""
    top = i * (ROW_HEIGHT + ROW_GAP)
    peak = max(values[i] for _, values in axis_buckets)
    bars = []
    for k, (label, values) in enumerate(axis_buckets):
        value = values[i]
        height = (ROW_HEIGHT - 14) * value / peak if peak else 0
        height = max(height, 1.5) if value else 0
        bars.append(
            Bar(
                x=round(LEFT + step * k + (step - bar) / 2, 1),
                y=round(top + ROW_HEIGHT - height, 1),
                width=round(bar, 1),
                height=round(height, 1),
                value=value,
                label=label,
                show_value=len(axis_buckets) <= 24,
            )
        )
    return SeriesRow(
        name=name, colour=COLOURS[i], top=top, base=top + ROW_HEIGHT, peak=peak, bars=tuple(bars)
    )
