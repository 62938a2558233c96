"""Readers of a build folder for export and report: round files, parts, image groups."""
import json

import pytest

from batchseg.errors import UsageError
from batchseg.io.build_info import label_parts, label_rounds, manifest_summary, read_round_file, vocabulary
from batchseg.io.label_stream import LabelFilter, choose_source, image_groups, plan_units
from batchseg.io.tables import labels_table, round_folder, write_part_atomic
from batchseg.testing_labels import RUN_ID, image_rows, write_labelled_build
from batchseg.world import CLASS_NAMES


@pytest.fixture
def build(tmp_path):
    return write_labelled_build(tmp_path, 5, seed=2, rounds=1, shard_size=2, evaluation=False)


def test_round_file_prefers_the_selftrain_folder(build):
    assert read_round_file(build.out, 1)["stats"]["agreement_with_previous"] == 0.9
    moved = build.out / "selftrain" / "round=1" / "_round.json"
    moved.parent.mkdir(parents=True)
    moved.write_text(json.dumps({"stats": {"agreement_with_previous": 0.5}}))
    assert read_round_file(build.out, 1)["stats"]["agreement_with_previous"] == 0.5
    assert read_round_file(build.out, 7) is None
    moved.write_text("{not json")
    with pytest.raises(UsageError, match="is not readable JSON"):
        read_round_file(build.out, 1)


def test_parts_are_part_globs_only(build):
    folder = round_folder(build.out, 0)
    (folder / "grid.zarr").mkdir()
    (folder / "other.parquet").write_bytes(b"")
    assert [p.name for p in label_parts(build.out, 0)] == [f"part-{RUN_ID}-{i:05d}.parquet" for i in range(3)]
    assert label_rounds(build.out) == [0, 1]


def test_manifest_summary_counts_current_files(build):
    summary = manifest_summary(build.out)
    assert summary.status_counts == {"ok": 5, "duplicate": 1, "truncated": 1} and summary.files == 7
    assert all(not image.path.startswith("copies/") for image in summary.images.values())
    assert vocabulary(build.out, [0]) == CLASS_NAMES


def test_an_image_split_over_two_parts_is_read_whole_once(build):
    ids = sorted(manifest_summary(build.out).images)
    index = {image.image_id: int(image.path.split("_")[1][:6]) for image in manifest_summary(build.out).images.values()}
    extra = [dict(r, segment_id=r["segment_id"] + 100) for r in image_rows(2, index[ids[0]], ids[0], 0)]
    write_part_atomic(labels_table(extra), round_folder(build.out, 0) / f"part-{RUN_ID}-00077.parquet")
    units = plan_units(label_parts(build.out, 0))
    owners = [u for u in units if ids[0] in u.image_ids]
    assert len(owners) == 1 and len(owners[0].extra) == 1
    assert sum(len(u.image_ids) for u in units) == 5
    groups = dict(g for u in units for g in image_groups(u, LabelFilter("sam", "instance")))
    assert len(groups) == 5
    single = [r for r in image_rows(2, index[ids[0]], ids[0], 0) if r["kind"] == "instance"]
    assert len(groups[ids[0]]) == 2 * len(single)
    none = dict(g for u in units for g in image_groups(u, LabelFilter("sam", "instance", min_score=1.01)))
    assert set(none) == set(groups) and not any(none.values())  # labelled, nothing kept


def test_choose_source_prefers_sam_and_names_the_choices():
    available = {("maskclip", "semantic"): 3, ("sam", "semantic"): 3, ("sam", "instance"): 4}
    assert choose_source(available, "semantic", None, 0) == "sam"
    assert choose_source(available, "semantic", "maskclip", 0) == "maskclip"
    with pytest.raises(UsageError, match="must be one of: maskclip, sam"):
        choose_source(available, "semantic", "student", 0)
    with pytest.raises(UsageError, match="no instance label rows"):
        choose_source({("maskclip", "semantic"): 1}, "instance", None, 0)
