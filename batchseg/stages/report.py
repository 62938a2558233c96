"""`batchseg report OUT`: a static HTML page about a build, in ``OUT/report/``.

The page (``index.html``) and its images are written to a hidden folder first and
swapped in by renames, so ``OUT/report`` always holds one whole report. It takes the
build lock: it reads what the other stages write and must not see their work half done.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from batchseg.errors import UsageError
from batchseg.io.build_info import embed_source, label_parts
from batchseg.io.files import atomic_folder, write_text_atomic
from batchseg.io.label_stream import choose_source, sources_and_kinds
from batchseg.io.runs import recorded_run
from batchseg.io.lock import build_lock
from batchseg.io.statuses import LabelKind
from batchseg.report.collect import ReportData, collect
from batchseg.report.gallery import GalleryImage, draw_overlay, draw_thumbnail, pick_gallery, semantic_rows
from batchseg.report.html import ReportPage, render_page
from batchseg.stages.report_options import ReportConfig  # noqa: F401  (light home; re-exported)

REPORT = "report"
IMAGES = "img"


@dataclass(frozen=True)
class ReportSummary:
    run_id: str
    index: Path
    page_bytes: int  # index.html
    total_bytes: int  # the whole report folder
    images: int  # image files written
    seconds: float
    notes: tuple[str, ...]

    def text(self) -> str:
        lines = [f"note: {n}" for n in self.notes]
        lines.append(f"report written: {self.index} ({self.page_bytes / 1024:.0f} KiB page, {self.images} images, "
                     f"{self.total_bytes / 1024:.0f} KiB in all; {self.seconds:.1f} s); open it in a browser")
        return "\n".join(lines)


def run_report(config: ReportConfig, progress: bool = True) -> ReportSummary:
    config.validate()
    started = time.perf_counter()
    with build_lock(config.out), recorded_run(config.out, "report", asdict(config)) as run:
        summary = _report_locked(config, run.run_id, progress, started)
        run.add_counts(page_bytes=summary.page_bytes, total_bytes=summary.total_bytes, images=summary.images,
                       seconds=summary.seconds)
    return summary


def _gallery_choice(config: ReportConfig, data: ReportData) -> tuple[int | None, str | None]:
    rounds = [r.round for r in data.rounds]
    if not rounds:
        if config.round is not None:
            raise UsageError(f"--round {config.round}: {config.out} has no labels yet")
        return None, None
    round_index = rounds[-1] if config.round is None else config.round
    if round_index not in rounds:
        raise UsageError(f"--round {round_index} has no labels in {config.out}; rounds: {', '.join(map(str, rounds))}")
    available = sources_and_kinds(label_parts(config.out, round_index))
    return round_index, choose_source(available, LabelKind.SEMANTIC, config.source, round_index)


def _draw_gallery(config: ReportConfig, data: ReportData, src: Path, round_index: int, source: str, folder: Path,
                  progress: bool, notes: list[str]) -> dict[str, list[GalleryImage]]:
    parts = label_parts(config.out, round_index)
    picks = pick_gallery(parts, source, config.per_class)
    wanted = {image_id for ids in picks.values() for image_id in ids if image_id in data.build.images}
    rows = semantic_rows(parts, source, wanted)
    drawn: dict[str, GalleryImage | None] = {}
    for image_id in tqdm(sorted(wanted), desc="gallery", unit="img", disable=not progress):
        image = data.build.images[image_id]
        drawn[image_id] = draw_overlay(src, image, rows.get(image_id, []), folder, f"overlay-{image_id[:16]}.jpg")
    missing = sum(1 for v in drawn.values() if v is None)
    if missing:
        notes.append(f"{missing} gallery images could not be read from {src}; pass --src FOLDER")
    gallery = {}
    for class_id, ids in picks.items():
        name = data.classes[class_id] if class_id < len(data.classes) else f"class {class_id}"
        shown = [drawn[i] for i in ids if drawn.get(i) is not None]
        if shown:
            gallery[name] = shown
    return gallery


def _report_locked(config: ReportConfig, run_id: str, progress: bool, started: float) -> ReportSummary:
    data = collect(config.out)
    # This run's own record still says "running": the page lists the runs before it.
    data = replace(data, runs=[r for r in data.runs if r.run_id != run_id])
    if not data.build.files:
        raise UsageError(f"{config.out} has no manifest rows; run `batchseg embed SRC {config.out}` first")
    notes: list[str] = []
    round_index, source = _gallery_choice(config, data)
    src = config.src or embed_source(config.out)
    if src is not None and not src.is_dir():
        notes.append(f"the source images ({src}) are not there: no gallery or thumbnails; pass --src FOLDER")
        src = None
    elif src is None:
        notes.append("no source folder recorded: no gallery or thumbnails; pass --src FOLDER")
    with atomic_folder(config.out / REPORT) as tmp:
        folder = tmp / IMAGES
        folder.mkdir()
        gallery, thumbs = {}, {}
        if src is not None and round_index is not None and config.per_class > 0:
            gallery = _draw_gallery(config, data, src, round_index, source, folder, progress, notes)
        if src is not None:
            for row in data.qc_flagged[: config.max_qc_thumbs]:
                image = data.build.images.get(str(row.get("image_id")))
                if image is not None:
                    thumb = draw_thumbnail(src, image, folder, f"qc-{image.image_id[:16]}.jpg")
                    if thumb:
                        thumbs[image.image_id] = thumb
        page = ReportPage(data, gallery, round_index, source, thumbs, notes)
        write_text_atomic(tmp / "index.html", render_page(page))
    final = config.out / REPORT
    files = [p for p in final.rglob("*") if p.is_file()]
    return ReportSummary(run_id, final / "index.html", (final / "index.html").stat().st_size,
                         sum(p.stat().st_size for p in files), len(files) - 1, time.perf_counter() - started,
                         tuple(notes))
