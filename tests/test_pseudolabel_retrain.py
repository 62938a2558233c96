"""Pseudolabel's retrain policy for rounds >= 1 when images are added (what `batchseg build` uses)."""
from __future__ import annotations

import json
import shutil

from batchseg.config import ClusterSettings, LabelSettings, PseudolabelConfig
from batchseg.labels.proposals import ProposalSettings
from batchseg.labels.selftrain import SelfTrainSettings
from batchseg.models.text import MASKCLIP_TEMPLATES, parse_classes
from batchseg.stages.pseudolabel import run_pseudolabel
from batchseg.io.tables import read_labels
from helpers import embed_args, run_cli


def _config(out, scheduler, retrain):
    labels = LabelSettings(vocabulary=parse_classes("red thing,green thing,blue thing"), templates=MASKCLIP_TEMPLATES,
                           proposals=ProposalSettings(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0))
    selftrain = SelfTrainSettings(epochs=1, stop_agreement=None, drift_tolerance=1.0)  # every round runs and is kept
    return PseudolabelConfig(out=out, labels=labels, selftrain=selftrain,
                             rounds=2, cluster=ClusterSettings(scheduler=scheduler), shard_size=4, retrain=retrain)


def _info(out, k):
    return json.loads((out / "selftrain" / f"round={k}" / "_round.json").read_text())


def test_kept_heads_label_new_images_and_a_retrained_round_retrains_the_rounds_after(
        tmp_path, _image_folder_template, tiny_models, dask_scheduler):
    src, out, later = tmp_path / "images", tmp_path / "build", tmp_path / "later"
    shutil.copytree(_image_folder_template, src)
    later.mkdir()
    for path in sorted(p for p in src.rglob("*") if p.is_file())[-2:]:
        path.rename(later / path.name)
    assert run_cli(embed_args(src, out, tiny_models, "--scheduler", dask_scheduler)).exit_code == 0
    first = run_pseudolabel(_config(out, dask_scheduler, "never"), progress=False)
    assert [r.images for r in first.rounds] == [6, 6, 6]
    heads = {k: (out / "selftrain" / f"round={k}" / "head.safetensors").read_bytes() for k in (1, 2)}
    rows_before = {k: read_labels(out, k).to_pylist() for k in (1, 2)}

    for path in later.iterdir():
        path.rename(src / path.name)
    assert run_cli(embed_args(src, out, tiny_models, "--scheduler", dask_scheduler)).exit_code == 0
    # Pretend round 1's head was retrained since round 2 learnt from its labels.
    info = _info(out, 1)
    (out / "selftrain" / "round=1" / "_round.json").write_text(json.dumps({**info, "trained_run": "elsewhere"}))
    second = run_pseudolabel(_config(out, dask_scheduler, "never"), progress=False)

    assert [r.images for r in second.rounds] == [2, 2, 8]  # round 1 kept its head; round 2 had to follow
    assert (out / "selftrain" / "round=1" / "head.safetensors").read_bytes() == heads[1]
    assert (out / "selftrain" / "round=2" / "head.safetensors").read_bytes() != heads[2]
    assert (_info(out, 1)["trained_images"], _info(out, 1)["images"]) == (6, 8)
    assert (_info(out, 2)["trained_images"], _info(out, 2)["previous_trained_run"]) == (8, "elsewhere")
    old = {r["image_id"] for r in rows_before[1]}
    assert [r for r in read_labels(out, 1).to_pylist() if r["image_id"] in old] == rows_before[1]
    assert len({r["image_id"] for r in read_labels(out, 2).to_pylist()}) == 8

    third = run_pseudolabel(_config(out, dask_scheduler, "always"), progress=False)
    assert [r.skipped for r in third.rounds] == [True, False, False]  # "always": the changed image set retrains
    assert _info(out, 1)["trained_images"] == 8
