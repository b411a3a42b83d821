"""One report in Markdown and HTML from the same content: headings, text, tables and PNG figures.

The content is built once (:class:`Report`) and rendered twice, so the two files never disagree. Figures are
referenced by paths relative to the report, so the report folder can be moved or zipped as a whole. Also here: the
figure kinds the studies need (bar charts with error bars, loss curves).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tools.io import atomic_path


@dataclass
class _Block:
    kind: str
    payload: Any


@dataclass
class Report:
    """Ordered content of a report; :meth:`write` renders ``<stem>.md`` and ``<stem>.html`` into a folder."""

    title: str
    blocks: list[_Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> "Report":
        self.blocks.append(_Block("heading", (level, text)))
        return self

    def paragraph(self, text: str) -> "Report":
        self.blocks.append(_Block("paragraph", text))
        return self

    def bullets(self, items: Sequence[str]) -> "Report":
        self.blocks.append(_Block("bullets", list(items)))
        return self

    def code(self, text: str) -> "Report":
        self.blocks.append(_Block("code", text))
        return self

    def table(
        self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str | None = None
    ) -> "Report":
        columns = list(columns) if columns is not None else (list(rows[0]) if rows else [])
        self.blocks.append(_Block("table", (columns, [dict(r) for r in rows], caption)))
        return self

    def figure(self, path: str | os.PathLike, caption: str = "") -> "Report":
        self.blocks.append(_Block("figure", (Path(path), caption)))
        return self

    # ---- rendering ------------------------------------------------------------------------------------------
    @staticmethod
    def _cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    def to_markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            if block.kind == "heading":
                level, text = block.payload
                out += ["#" * level + " " + text, ""]
            elif block.kind == "paragraph":
                out += [block.payload, ""]
            elif block.kind == "bullets":
                out += [f"- {item}" for item in block.payload] + [""]
            elif block.kind == "code":
                out += ["```", block.payload.rstrip(), "```", ""]
            elif block.kind == "table":
                columns, rows, caption = block.payload
                if caption:
                    out += [f"*{caption}*", ""]
                out.append("| " + " | ".join(columns) + " |")
                out.append("| " + " | ".join("---" for _ in columns) + " |")
                for row in rows:
                    out.append("| " + " | ".join(self._cell(row.get(c)).replace("|", "\\|") for c in columns) + " |")
                out.append("")
            elif block.kind == "figure":
                path, caption = block.payload
                out += [f"![{caption}]({_relative(path, base)})", ""]
                if caption:
                    out += [f"*{caption}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self, base: Path) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for block in self.blocks:
            if block.kind == "heading":
                level, text = block.payload
                body.append(f"<h{level}>{e(text)}</h{level}>")
            elif block.kind == "paragraph":
                body.append(f"<p>{e(block.payload)}</p>")
            elif block.kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.payload) + "</ul>")
            elif block.kind == "code":
                body.append(f"<pre>{e(block.payload)}</pre>")
            elif block.kind == "table":
                columns, rows, caption = block.payload
                head = "".join(f"<th>{e(c)}</th>" for c in columns)
                cells = "".join(
                    "<tr>" + "".join(f"<td>{e(self._cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
                )
                cap = f"<caption>{e(caption)}</caption>" if caption else ""
                body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif block.kind == "figure":
                path, caption = block.payload
                body.append(
                    f'<figure><img src="{e(_relative(path, base))}" alt="{e(caption)}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
            "th{background:#eee}caption{font-style:italic;margin-bottom:4px}img{max-width:100%}"
            "figcaption{font-style:italic;color:#444}pre{background:#f5f5f5;padding:8px;overflow-x:auto}"
        )
        return (
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )

    def write(self, out_dir: str | os.PathLike, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<stem>.md`` and ``<stem>.html`` atomically into ``out_dir``; return both paths."""
        out = Path(out_dir)
        md, page = out / f"{stem}.md", out / f"{stem}.html"
        with atomic_path(md) as tmp:
            tmp.write_text(self.to_markdown(out))
        with atomic_path(page) as tmp:
            tmp.write_text(self.to_html(out))
        return md, page


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(base).resolve())
    except ValueError:  # another drive (Windows)
        return str(path)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), ignoring NaN."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def bar_chart(
    groups: Sequence[str],
    series: Mapping[str, Sequence[Sequence[float]]],
    out_png: str | os.PathLike,
    ylabel: str,
    title: str = "",
    reference: tuple[str, float] | None = None,
) -> Path:
    """Grouped bars of means with standard-deviation error bars and the individual runs as dots.

    ``series[name][g]`` holds the values (one per seed) of series ``name`` in group ``groups[g]``; a
    ``reference`` line (label, value) marks e.g. the real-only baseline.
    """
    import matplotlib.pyplot as plt

    from tools.figures import save_figure

    names = list(series)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(len(names), 1) * 0.6 + 2), 4))
    for k, name in enumerate(names):
        x = np.arange(len(groups)) + (k - (len(names) - 1) / 2) * width
        stats = [mean_std(v) for v in series[name]]
        means = [m for m, _ in stats]
        stds = [s for _, s in stats]
        ax.bar(x, means, width, yerr=stds, capsize=3, label=name, alpha=0.8)
        for xi, values in zip(x, series[name]):
            ax.scatter(np.full(len(values), xi), values, s=9, color="black", zorder=3)
    if reference is not None:
        ax.axhline(reference[1], color="gray", linestyle="--", linewidth=1, label=reference[0])
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png)


def line_chart(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    out_png: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_y: bool = False,
) -> Path:
    """Curves (e.g. loss per epoch of each arm); ``curves[name] = (x, y)``."""
    import matplotlib.pyplot as plt

    from tools.figures import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png)
