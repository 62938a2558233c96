"""Charts as SVG strings to inline in HTML (no xmlns needed there): no script, no fonts to fetch."""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb")
ROW = 18
LABEL_W = 150
FONT = 'font-family="sans-serif" font-size="11"'


def _fmt(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def hbar_chart(items: list[tuple[str, float]], title: str, width: int = 520, colour: str = PALETTE[0],
               percent: bool = False) -> str:
    """Horizontal bars, one per (label, value) with value >= 0; ``percent`` shows values in [0, 1] as %."""
    bar_w = width - LABEL_W - 60
    top = max((v for _, v in items if not math.isnan(v)), default=0.0)
    scale = 1.0 if percent else (top or 1.0)
    height = 24 + ROW * max(1, len(items))
    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="0" y="14" {FONT} font-weight="bold">{escape(title)}</text>']
    for i, (label, value) in enumerate(items):
        y = 22 + i * ROW
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + 12}" text-anchor="end" {FONT}>{escape(label[:24])}</text>')
        if math.isnan(value):
            parts.append(f'<text x="{LABEL_W + 4}" y="{y + 12}" {FONT} fill="#888">n/a</text>')
            continue
        w = max(0.0, value / scale * bar_w)
        parts.append(f'<rect x="{LABEL_W}" y="{y + 2}" width="{w:.1f}" height="{ROW - 5}" fill="{colour}"/>')
        shown = f"{100 * value:.1f}%" if percent else _fmt(value)
        parts.append(f'<text x="{LABEL_W + w + 4:.1f}" y="{y + 12}" {FONT}>{shown}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
               width: int = 520, height: int = 220, y_range: tuple[float, float] | None = None) -> str:
    """Lines with markers, one per named series of (x, y) points; a legend on the right."""
    points = [p for values in series.values() for p in values if not math.isnan(p[1])]
    left, right, top, bottom = 48, 130, 24, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for x, _ in points] or [0.0, 1.0]
    ys = [y for _, y in points] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range else (min(0.0, min(ys)), max(ys))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="0" y="14" {FONT} font-weight="bold">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" {FONT}>{_fmt(round(y, 3))}</text>')
    for x in sorted(set(xs)):
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 14}" text-anchor="middle" {FONT}>{_fmt(x)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" {FONT}>{escape(x_label)}</text>')
    parts.append(f'<text x="10" y="{top + plot_h / 2}" {FONT} transform="rotate(-90 10 {top + plot_h / 2})" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        kept = [(x, y) for x, y in values if not math.isnan(y)]
        if len(kept) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in kept)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in kept:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        ly = top + 10 + i * 16
        parts.append(f'<rect x="{left + plot_w + 10}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{left + plot_w + 24}" y="{ly + 1}" {FONT}>{escape(name[:18])}</text>')
    parts.append("</svg>")
    return "".join(parts)
