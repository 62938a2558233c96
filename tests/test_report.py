"""`batchseg report`: the page's contents, its optional sections, and a real browser loading it."""
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from filelock import FileLock
from PIL import Image

from batchseg.cli import cli
from batchseg.io.build_info import manifest_summary
from batchseg.io.lock import LOCK_NAME
from batchseg.testing_labels import write_labelled_build
from batchseg.world import CLASS_NAMES
from browser import find_chromium, load_page

COUNT = 10


@pytest.fixture
def build(tmp_path):
    return write_labelled_build(tmp_path / "b", COUNT, seed=4, rounds=1, shard_size=4)


def report(*args):
    return CliRunner().invoke(cli, ["report", *map(str, args), "-q"], catch_exceptions=False)


def _sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', page)


def _add_qc_and_students(out: Path) -> list[str]:
    ids = sorted(manifest_summary(out).images)
    flagged = ids[:2]
    table = pa.table({"image_id": ids, "score": np.linspace(0, 1, len(ids)),
                      "flagged": [i in flagged for i in ids], "reason": ["outlier" if i in flagged else None for i in ids]})
    (out / "qc").mkdir()
    pq.write_table(table, out / "qc" / "part-00000.parquet")
    student = out / "students" / "tiny-semantic"
    (student / "metrics").mkdir(parents=True)
    (student / "config.json").write_text(json.dumps({"kind": "semantic", "blocks": "dynamic", "classes": list(CLASS_NAMES)}))
    pq.write_table(pa.table({"epoch": [0, 1, 2], "loss": [1.2, 0.8, 0.5], "miou": [0.1, 0.3, 0.4]}),
                   student / "metrics" / "part-00000.parquet")
    return flagged


def test_report_shows_build_labels_evaluation_and_gallery(build):
    result = report(build.out, "--per-class", "2")
    assert result.exit_code == 0, result.output
    folder = build.out / "report"
    page = (folder / "index.html").read_text()
    for heading in ('id="build"', 'id="labels"', 'id="evaluation"', 'id="gallery"', "Round 0", "Round 1",
                    "truncated", "mIoU per round"):
        assert heading in page
    assert 'id="qc"' not in page and 'id="students"' not in page  # absent folders, absent sections
    assert "http://" not in page and "https://" not in page and "<script" not in page  # offline, static
    sources = _sources(page)
    assert sources and all((folder / s).is_file() for s in sources)
    assert len(set(sources)) == len(list((folder / "img").iterdir()))
    for name in CLASS_NAMES:  # every class present in the labels has a gallery heading with <= 2 images
        block = page.split(f"<h3>{name}</h3>")
        if len(block) > 1:
            assert 1 <= block[1].split("<h3>")[0].count("<img") <= 2
    with Image.open(folder / sources[0]) as img:
        assert img.format == "JPEG" and max(img.size) <= 320
    records = [json.loads(p.read_text()) for p in (build.out / "runs").glob("*.json")]
    assert any(r["command"] == "report" and r["status"] == "finished" for r in records)


def test_a_round_set_aside_is_named_with_why_and_rounds_show_their_anchor_agreement(build):
    round_1 = build.out / "labels" / "round=1" / "_round.json"  # where write_labelled_build keeps it
    info = json.loads(round_1.read_text())
    round_1.write_text(json.dumps({**info, "stats": {**info["stats"], "anchor_agreement": 0.9876}}))
    drifted = build.out / "selftrain" / "round=2" / "_round.json"
    drifted.parent.mkdir(parents=True)
    drifted.write_text(json.dumps({"discarded": True, "decision": {"stop": True, "discard": True,
                                                                   "why": "drifted: 0.9853 < 0.9876"}}))
    result = report(build.out)
    assert result.exit_code == 0, result.output
    page = (build.out / "report" / "index.html").read_text()
    assert "Round 2 was set aside, so round 1 is the result: drifted: 0.9853 &lt; 0.9876" in page
    assert "keeps round 0's surest labels on 98.8%" in page
    assert "<h3>Round 2</h3>" not in page


def test_qc_and_students_sections_render_when_present(build):
    flagged = _add_qc_and_students(build.out)
    result = report(build.out)
    assert result.exit_code == 0, result.output
    folder = build.out / "report"
    page = (folder / "index.html").read_text()
    assert 'id="qc"' in page and f"{COUNT} images scored, 2 flagged" in page
    for image_id in flagged:
        assert f"img/qc-{image_id[:16]}.jpg" in page and (folder / "img" / f"qc-{image_id[:16]}.jpg").is_file()
    assert 'id="students"' in page and "tiny-semantic" in page and "metrics per epoch" in page


def test_rerun_replaces_the_report_whole_and_errors_exit_cleanly(build, tmp_path):
    assert report(build.out).exit_code == 0
    (build.out / "report" / "img" / "stale.jpg").write_bytes(b"x")
    assert report(build.out, "--round", "0", "--source", "maskclip").exit_code == 0
    assert not (build.out / "report" / "img" / "stale.jpg").exists()
    assert "Round 0, maskclip labels" in (build.out / "report" / "index.html").read_text()
    assert not [p for p in build.out.iterdir() if p.name.startswith(".report")]
    for args, message, code in (
        ([build.out, "--round", "9"], "--round 9 has no labels", 2),
        ([build.out, "--source", "student", "--round", "0"], "--source must be one of", 2),
        ([tmp_path / "missing"], "is not a batchseg build", 2),
        ([build.out, "--per-class", "-1"], "--per-class must be in 0..50", 2),
    ):
        result = CliRunner().invoke(cli, ["report", *map(str, args)])
        assert result.exit_code == code and message in result.output, result.output
    with FileLock(str(build.out / LOCK_NAME)):
        result = CliRunner().invoke(cli, ["report", str(build.out)])
    assert result.exit_code == 75


def test_report_without_source_images_says_so(build, tmp_path):
    build.images.rename(tmp_path / "moved")
    result = report(build.out)
    assert result.exit_code == 0 and "no gallery or thumbnails; pass --src FOLDER" in result.output
    assert report(build.out, "--src", tmp_path / "moved").exit_code == 0
    assert _sources((build.out / "report" / "index.html").read_text())


def test_headless_chromium_loads_the_page_without_errors(build):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed and could not be (`make test` installs Debian's `chromium` "
                    "with apt-get when it can): the browser check of the report did not run")
    _add_qc_and_students(build.out)
    assert report(build.out).exit_code == 0
    index = build.out / "report" / "index.html"
    check = load_page(chromium, index.resolve().as_uri())
    assert check.errors == []
    assert check.title.startswith("batchseg report")
    expected = _sources(index.read_text())
    assert [i["src"] for i in check.images] == expected and len(expected) > 10
    assert all(i["complete"] and i["width"] > 0 for i in check.images), check.images
    shot = np.asarray(Image.open(io.BytesIO(check.screenshot)).convert("RGB"))
    assert shot.shape[0] > 900 and shot.shape[1] >= 1000  # the whole page, not the window
    colours = len(np.unique(shot.reshape(-1, 3)[::7], axis=0))
    assert shot.std() > 20 and colours > 100  # text, charts and images, not a blank page
