"""The report's month-by-month chart, as its pure functions draw it: counts per month in,
the SVG's bars, rows and axis labels out, checked against the numbers a reader sees."""

from __future__ import annotations

from service.answer.report.chart import (
    AxisLabel,
    Bar,
    Bucket,
    Chart,
    buckets,
    chart,
    series_row,
)


def test_nothing_dated_draws_no_chart() -> None:
    assert chart({}) is None


def test_one_month_is_one_full_height_bar_per_series_on_its_own_scale() -> None:
    drawn = chart({"2026-06": {"messages": 2, "opens": 0, "clicks": 1, "events": 900}})

    assert isinstance(drawn, Chart)
    assert (drawn.width, drawn.height, drawn.left, drawn.right) == (880, 340, 128, 872)
    assert (drawn.axis, drawn.per) == (324, "month")
    assert [(r.name, r.top, r.base, r.peak) for r in drawn.rows] == [
        ("Messages sent", 0, 64, 2),
        ("Opens", 82, 146, 0),
        ("Clicks", 164, 228, 1),
        ("Events", 246, 310, 900),
    ]
    # One bucket spans the whole plot (744 wide); a bar is at most 36 wide, centred in it.
    messages, opens, clicks, events = (row.bars[0] for row in drawn.rows)
    assert messages == Bar(x=482.0, y=14.0, width=36.0, height=50.0, value=2,
                           label="Jun 2026", show_value=True)  # fmt: skip
    assert (clicks.y, clicks.height) == (178.0, 50.0)  # 1 of a peak of 1: full height too
    assert (events.y, events.height) == (260.0, 50.0)
    assert (opens.y, opens.height, opens.value) == (146, 0, 0)  # no bar, on the baseline
    assert drawn.labels == (AxisLabel(x=500.0, text="Jun 2026"),)


def test_months_in_between_are_drawn_empty_and_the_year_is_named_where_it_starts() -> None:
    axis, per = buckets(
        {"2025-11": {"messages": 3}, "2026-02": {"opens": 5, "events": 7}, "2026-01": {}}
    )

    assert per == "month"
    assert axis == [
        Bucket("Nov 2025", [3, 0, 0, 0]),
        Bucket("Dec", [0, 0, 0, 0]),
        Bucket("Jan 2026", [0, 0, 0, 0]),
        Bucket("Feb", [0, 5, 0, 7]),
    ]


def test_bars_are_placed_by_month_and_scaled_to_the_row_peak() -> None:
    drawn = chart({"2026-01": {"opens": 40}, "2026-03": {"opens": 10}})

    assert drawn is not None
    opens = drawn.rows[1]
    # Three months: each 248 wide, bars 36 wide (the cap) in the middle of each.
    assert [(b.label, b.x, b.y, b.height, b.value) for b in opens.bars] == [
        ("Jan 2026", 234.0, 96.0, 50.0, 40),
        ("Feb", 482, 146, 0, 0),
        ("Mar", 730.0, 133.5, 12.5, 10),
    ]
    assert [label.text for label in drawn.labels] == ["Jan 2026", "Feb", "Mar"]
    assert [label.x for label in drawn.labels] == [252.0, 500.0, 748.0]


def test_a_count_far_below_the_peak_still_shows_a_sliver() -> None:
    row = series_row(
        0, "Messages sent", [Bucket("Jan 2026", [1000]), Bucket("Feb", [1])], 372.0, 36.0
    )

    assert row.peak == 1000
    assert [bar.height for bar in row.bars] == [50.0, 1.5]
    assert [bar.y for bar in row.bars] == [14.0, 62.5]
    assert row.colour == "#2f5d8a"


def test_four_years_are_drawn_per_month_with_about_twelve_labels() -> None:
    drawn = chart({"2022-01": {"messages": 1}, "2025-12": {"messages": 1}})

    assert drawn is not None
    assert drawn.per == "month"
    bars = drawn.rows[0].bars
    assert len(bars) == 48
    assert bars[1].width == 10.8  # 744 / 48 = 15.5 per month, 70 % of it
    assert not bars[0].show_value  # too many bars to write each count above its own
    assert [label.text for label in drawn.labels] == [
        "Jan 2022", "May", "Sep", "Jan 2023", "May", "Sep",
        "Jan 2024", "May", "Sep", "Jan 2025", "May", "Sep",
    ]  # fmt: skip


def test_a_longer_span_is_drawn_per_year_with_each_year_summed() -> None:
    axis, per = buckets(
        {
            "2021-12": {"messages": 2, "events": 1},
            "2022-03": {"messages": 1, "clicks": 4},
            "2025-12": {"opens": 6},
            "2022-11": {"messages": 3},
        }
    )

    assert per == "year"
    assert axis == [
        Bucket("2021", [2, 0, 0, 1]),
        Bucket("2022", [4, 0, 4, 0]),
        Bucket("2025", [0, 6, 0, 0]),
    ]  # years without a count are left out, unlike months


def test_centuries_of_stray_dates_keep_the_latest_sixty_years() -> None:
    months = {f"{year}-05": {"events": 1} for year in range(1900, 2027)}

    drawn = chart(months)

    assert drawn is not None
    assert drawn.per == "year"
    bars = drawn.rows[3].bars
    assert [bars[0].label, bars[-1].label, len(bars)] == ["1967", "2026", 60]
    assert bars[0].width == 8.7  # 744 / 60 = 12.4 per year, 70 % of it
    assert [label.text for label in drawn.labels][:3] == ["1967", "1972", "1977"]
