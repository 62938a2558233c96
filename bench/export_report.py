"""Speed and memory of `batchseg export`, speed and size of `batchseg report`.

Builds two labelled builds from the synthetic world's truth (``batchseg.testing_labels``:
no models run; every label row is real RLE of a real mask): a small one (``--small``
images, the baseline) and a large one (``--large`` images, about 10k exported label rows
at the default). Each export and the report run in a fresh subprocess, which reports its
own peak RSS (``VmHWM``), so memory is measured per command; memory bounded by one label
part means the large/small peak ratio stays near 1 while the rows grow ``large/small``
times. The report runs on the small build (``--small`` images, 1,000 by default).

    .venv/bin/python bench/export_report.py                         # 1,000 vs 4,200 images
    .venv/bin/python bench/export_report.py --small 40 --large 160  # smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common

from batchseg.choices import EXPORT_FORMATS as FORMATS


def child(argv: list[str]) -> None:
    """Run one command in this process and print its seconds and peak RSS as JSON."""
    from batchseg.stages.export import run_export
    from batchseg.stages.export_plan import ExportConfig
    from batchseg.stages.report import ReportConfig, run_report

    started = time.perf_counter()
    if argv[0] == "export":
        out, dest, fmt, images = argv[1:5]
        summary = run_export(ExportConfig(out=Path(out), dest=Path(dest), format=fmt, images=images,
                                          split=(("val", 0.1),)), progress=False)
        result = {"images": summary.images, "annotations": summary.annotations}
    else:
        summary = run_report(ReportConfig(out=Path(argv[1])), progress=False)
        result = {"page_bytes": summary.page_bytes, "total_bytes": summary.total_bytes, "files": summary.images + 1}
    result.update(seconds=time.perf_counter() - started, peak=_common.peak_rss_bytes())
    print(json.dumps(result))


def run_child(*args: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def exported_rows(out: Path) -> int:
    from batchseg.io.build_info import label_parts, label_rounds
    from batchseg.io.label_stream import sources_and_kinds

    last = label_rounds(out)[-1]
    return sources_and_kinds(label_parts(out, last)).get(("sam", "semantic"), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000, help="images of the baseline build (and the report)")
    parser.add_argument("--large", type=int, default=4200, help="images of the large build (about 10k rows)")
    parser.add_argument("--shard-size", type=int, default=64, help="images per label part, as pseudolabel's default")
    parser.add_argument("--workdir", default=None, help="work here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    from batchseg.testing_labels import write_labelled_build

    _common.setup_logging()
    print("\n".join(_common.machine_lines()))
    root, created = _common.workdir(args.workdir, "batchseg-bench-export-")
    try:
        builds = {}
        for name, count, rounds in (("small", args.small, 1), ("large", args.large, 0)):
            with _common.Timer() as timer:
                builds[name] = write_labelled_build(root / name, count, seed=11, rounds=rounds,
                                                    shard_size=args.shard_size, evaluation=True)
            print(f"{name} build: {count} images, {exported_rows(builds[name].out)} exported rows "
                  f"(round {rounds}, sam semantic), written in {timer.seconds:.1f} s")
        rows, peaks = [], {}
        for fmt in FORMATS:
            for images in ("none", "copy"):
                for name in ("small", "large"):
                    build = builds[name]
                    dest = root / f"{name}-{fmt}-{images}"
                    shutil.rmtree(dest, ignore_errors=True)
                    result = run_child("export", str(build.out), str(dest), fmt, images)
                    again = run_child("export", str(build.out), str(dest), fmt, images)  # incremental: nothing new
                    label_rows = exported_rows(build.out)
                    peaks[(fmt, images, name)] = result["peak"]
                    ratio = _common.ratio(result["peak"], peaks[(fmt, images, "small")]) if name == "large" else "1 (base)"
                    rows.append([fmt, images, build.count, label_rows, result["annotations"], f"{result['seconds']:.2f}",
                                 f"{label_rows / result['seconds']:.0f}", _common.mib(result["peak"]), ratio,
                                 f"{again['seconds']:.2f}"])
        print("\nexport (fresh subprocess per run; --split val=0.1):")
        print(_common.table(["format", "images", "build images", "label rows", "written", "seconds", "rows/s",
                             "peak MiB", "peak / small", "rerun s"], rows))
        result = run_child("report", str(builds["small"].out))
        print(f"\nreport on {args.small} images (rounds 0-1, evaluation, gallery of 4 per class):")
        print(_common.table(["images", "seconds", "index.html KiB", "report KiB", "files", "peak MiB"], [[
            args.small, f"{result['seconds']:.2f}", f"{result['page_bytes'] / 1024:.0f}",
            f"{result['total_bytes'] / 1024:.0f}", result["files"], _common.mib(result["peak"]),
        ]]))
        print(_common.load_line())
    finally:
        if created:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
