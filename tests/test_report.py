"""The report writer: Markdown and HTML from one content, relative figure paths, charts."""

from __future__ import annotations

import math

from tools.report import Report, bar_chart, line_chart, mean_std


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, math.sqrt(2.0))


def test_report_renders_tables_and_figures_in_both_formats(tmp_path):
    figure = bar_chart(
        ["100:0", "50:50"],
        {"VAE": [[0.5, 0.6], [0.7, 0.72]], "DM": [[0.55], [0.71, 0.7]]},
        tmp_path / "figs" / "bars.png",
        "Dice",
        reference=("real only", 0.7),
    )
    curve = line_chart({"arm a": ([1, 2, 3], [1.0, 0.5, 0.3])}, tmp_path / "figs" / "loss.png", "epoch", "loss")
    report = Report("Study <1>").heading("Results").paragraph("Mean | std over 3 seeds.")
    report.table([{"arm": "real", "dice": 0.71234, "nsd": None}], caption="Table 1").figure(figure, "bars")
    report.figure(curve, "loss").bullets(["a", "b"]).code("python -m tools study")
    md_path, html_path = report.write(tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    assert "| arm | dice | nsd |" in md and "| real | 0.7123 | n/a |" in md
    assert "![bars](figs/bars.png)" in md and "Mean | std" in md
    assert "<td>0.7123</td>" in page and 'src="figs/bars.png"' in page
    assert "&lt;1&gt;" in page, "text is escaped in HTML"
    assert figure.read_bytes()[:4] == b"\x89PNG" and curve.stat().st_size > 5000
