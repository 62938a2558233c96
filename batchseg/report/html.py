"""The report page: one static, offline HTML file (inline CSS and SVG, no script, no CDN).

``render_page`` turns collected data (``batchseg.report.collect``) and the drawn images
(``batchseg.report.gallery``) into the text of ``index.html``; images are referenced by
relative paths in the report folder. The qc and students sections appear only when the
build has those folders.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from html import escape

from batchseg.io.statuses import USABLE_STATUSES
from batchseg.report.collect import ReportData, RoundInfo, StudentInfo, Table
from batchseg.report.gallery import GalleryImage
from batchseg.report.svg import hbar_chart, line_chart

CSS = """
body{font-family:sans-serif;margin:0 auto;max-width:1100px;padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:16px 0 6px} nav a{margin-right:12px} .muted{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} .cards{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:4px;padding:8px 10px} figure{margin:0;display:inline-block;vertical-align:top;
width:220px;margin:0 10px 12px 0} figure img{max-width:220px;border:1px solid #ccc} figcaption{font-size:12px;color:#444}
.thumb{max-width:120px;max-height:120px}
"""


@dataclass(frozen=True)
class ReportPage:
    """What the page shows besides the collected data."""

    data: ReportData
    gallery: dict[str, list[GalleryImage]]  # class name -> drawn images
    gallery_round: int | None
    gallery_source: str | None
    qc_thumbs: dict[str, str]  # image id -> thumbnail file
    notes: list[str]


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """HTML table from already-escaped cells; the first ``left`` columns align left."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * float(value):.1f}"


def _build(page: ReportPage) -> str:
    build = page.data.build
    failures = {k: v for k, v in build.status_counts.items() if k not in USABLE_STATUSES}
    rows = [["files (current)", str(build.files)], ["unique images", str(len(build.images))]]
    rows += [[escape(k), str(v)] for k, v in sorted(build.status_counts.items())]
    html = ['<h2 id="build">Build</h2>', _table(["", "count"], rows)]
    if failures:
        html.append(hbar_chart(sorted(failures.items(), key=lambda kv: -kv[1]), "Files that could not be used, by kind",
                               colour="#ee6677"))
    runs = page.data.runs[-15:]
    if runs:
        html.append("<h3>Runs</h3>")
        html.append(_table(["run", "command", "status", "finished"],
                           [[escape(r.run_id), escape(r.command), escape(r.status), escape(r.finished_at[:19])]
                            for r in runs], left=4))
    return "".join(html)


def _round_card(info: RoundInfo) -> str:
    stats = info.stats or {}
    rows = [[f"{escape(s)} / {escape(k)}", str(n), f"{info.mean_score.get((s, k), float('nan')):.3f}"]
            for (s, k), n in sorted(info.rows.items())]
    anchor = stats.get("anchor_agreement")  # rounds >= 1: the share of round 0's surest cells it kept
    kept = "" if anchor is None else f"; keeps round 0's surest labels on {_pct(anchor)}%"
    extra = (f'<div class="muted">images {info.images}; mean confidence {_pct(stats.get("mean_confidence"))}%; '
             f'agreement with previous round {_pct(stats.get("agreement_with_previous"))}%{kept}</div>')
    chart = ""
    histogram = stats.get("class_histogram") or {}
    if histogram:
        chart = hbar_chart(list(histogram.items()), f"Round {info.round}: labelled cells per class", width=460)
    return (f'<div class="card"><h3>Round {info.round}</h3>{extra}'
            f'{_table(["source / kind", "rows", "mean score"], rows)}{chart}</div>')


def _labels(page: ReportPage) -> str:
    rounds = page.data.rounds
    if not rounds:
        return '<h2 id="labels">Labels</h2><p class="muted">No labels yet: run <code>batchseg pseudolabel</code>.</p>'
    html = ['<h2 id="labels">Labels</h2>']
    series = {
        "mean confidence": [(r.round, _num((r.stats or {}).get("mean_confidence"))) for r in rounds],
        "agreement": [(r.round, _num((r.stats or {}).get("agreement_with_previous"))) for r in rounds],
    }
    if len(rounds) > 1:
        html.append(line_chart(series, "Confidence and agreement between rounds", "round", "fraction",
                               y_range=(0.0, 1.0)))
    html.append('<div class="cards">' + "".join(_round_card(r) for r in rounds) + "</div>")
    for round_index, why in page.data.set_aside:
        html.append(f'<p class="muted">Round {round_index} was set aside, so round {round_index - 1} is the '
                    f'result: {escape(why)}</p>')
    return "".join(html)


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _evaluation(page: ReportPage) -> str:
    evaluations = page.data.evaluations
    if not evaluations:
        return ""
    latest = evaluations[-1]
    results = latest["results"]
    html = ['<h2 id="evaluation">Evaluation</h2>',
            f'<p class="muted">{escape(str(latest.get("eval_id", "")))}: against {escape(str(latest.get("gt", "")))} '
            f'({escape(str(latest.get("gt_format", "")))}); IoU in %.</p>']
    by_source: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        by_source.setdefault(str(r["source"]), []).append((float(r["round"]), _num(r.get("miou"))))
    html.append(line_chart(by_source, "mIoU per round", "round", "mIoU", y_range=(0.0, 1.0)))
    present = [c["class_name"] for c in (results[0].get("per_class") or [])
               if any(_class_iou(r, c["class_name"]) is not None for r in results)]
    header = ["round", "source", "images", "mIoU", "pixAcc"] + [escape(n) for n in present]
    rows = [[str(r["round"]), escape(str(r["source"])), str(r.get("images", "")), _pct(r.get("miou")),
             _pct(r.get("pixel_accuracy"))] + [_pct(_class_iou(r, n)) for n in present] for r in results]
    html.append(_table(header, rows, left=2))
    if len(evaluations) > 1:
        html.append('<p class="muted">Earlier evaluations: ' + "; ".join(
            f'{escape(str(e.get("eval_id")))} (best mIoU {_pct(max((_num(r.get("miou")) for r in e["results"]), default=None))}%)'
            for e in evaluations[:-1]) + "</p>")
    return "".join(html)


def _class_iou(result: dict, name: str):
    for c in result.get("per_class") or []:
        if c.get("class_name") == name:
            return c.get("iou")
    return None


def _generic_table(table: Table, thumbs: dict[str, str] | None = None, limit: int = 50) -> str:
    header = (["image"] if thumbs is not None else []) + [escape(c) for c in table.columns]
    rows = []
    for row in table.rows[:limit]:
        cells = [escape(str(row.get(c, ""))) for c in table.columns]
        if thumbs is not None:
            thumb = thumbs.get(str(row.get("image_id")))
            cells.insert(0, f'<img class="thumb" src="{escape(thumb)}" alt="flagged image">' if thumb else "-")
        rows.append(cells)
    more = f'<p class="muted">{table.total_rows - len(rows)} more rows not shown.</p>' if table.total_rows > len(rows) else ""
    return _table(header, rows, left=len(header)) + more


def _qc(page: ReportPage) -> str:
    qc = page.data.qc
    if qc is None:
        return ""
    html = ['<h2 id="qc">Quality control</h2>',
            f'<p class="muted">{qc.total_rows} images scored, {len(page.data.qc_flagged)} flagged.</p>']
    if page.data.qc_flagged:
        images = page.data.build.images
        rows = [{"path": images[r["image_id"]].path if r.get("image_id") in images else "-", **r}
                for r in page.data.qc_flagged]
        flagged = Table(list(rows[0].keys()), rows, len(rows))
        html.append(_generic_table(flagged, page.qc_thumbs))
    elif qc.rows:
        html.append(_generic_table(qc, limit=20))
    return "".join(html)


def _student(student: StudentInfo) -> str:
    scalars = [[escape(k), escape(str(v))] for k, v in student.config.items() if isinstance(v, (str, int, float, bool))]
    html = [f"<h3>{escape(student.name)}</h3>", _table(["setting", "value"], scalars[:20], left=2) if scalars else ""]
    metrics = student.metrics
    if metrics is not None and metrics.rows:
        x = "epoch" if "epoch" in metrics.columns else None
        numeric = [c for c in metrics.columns if c != x and all(isinstance(r.get(c), (int, float)) for r in metrics.rows)]
        if x and numeric:
            series = {c: [(float(r[x]), float(r[c])) for r in metrics.rows] for c in numeric[:5]}
            html.append(line_chart(series, f"{student.name}: metrics per epoch", "epoch", "value"))
        last = Table(metrics.columns, metrics.rows[-5:], metrics.total_rows)
        html.append(_generic_table(last, limit=5))
    return "".join(html)


def _students(page: ReportPage) -> str:
    students = page.data.students
    if students is None:
        return ""
    if not students:
        return '<h2 id="students">Students</h2><p class="muted">No student trained yet.</p>'
    return '<h2 id="students">Students</h2>' + "".join(_student(s) for s in students)


def _gallery(page: ReportPage) -> str:
    html = ['<h2 id="gallery">Gallery</h2>']
    if not page.gallery:
        html.append('<p class="muted">No images to show.</p>')
        return "".join(html)
    html.append(f'<p class="muted">Round {page.gallery_round}, {escape(str(page.gallery_source))} labels: for each '
                "class the images where it covers the most pixels, labels blended in, class names and scores below.</p>")
    for name, images in page.gallery.items():
        html.append(f"<h3>{escape(name)}</h3>")
        for image in images:
            html.append(f'<figure><img src="{escape(image.file)}" alt="{escape(image.path)} with labels">'
                        f"<figcaption>{escape(image.path)}</figcaption></figure>")
    return "".join(html)


def render_page(page: ReportPage) -> str:
    sections = [_build(page), _labels(page), _evaluation(page), _qc(page), _students(page), _gallery(page)]
    nav = [("build", "Build"), ("labels", "Labels"), ("evaluation", "Evaluation"), ("qc", "Quality control"),
           ("students", "Students"), ("gallery", "Gallery")]
    body = "".join(sections)
    links = " ".join(f'<a href="#{key}">{label}</a>' for key, label in nav if f'id="{key}"' in body)
    notes = "".join(f'<p class="muted">note: {escape(n)}</p>' for n in page.notes)
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"batchseg report: {page.data.out.resolve().name}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{CSS}</style></head><body>'
        f'<h1>{escape(title)}</h1><div class="muted">{escape(str(page.data.out.resolve()))}; '
        f'{len(page.data.classes)} classes; written {created}</div><nav>{links}</nav>{notes}{body}</body></html>\n'
    )
