"""After each round, pseudolabel decides from the labels alone (no ground truth) whether the
round is set aside as drifted, whether self-training stops, or whether it goes on."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchseg.config import LabelSettings, PseudolabelConfig
from batchseg.io.build_info import ROUND_FILE
from batchseg.io.files import write_json_atomic
from batchseg.io.tables import selftrain_folder
from batchseg.labels.settings import SelfTrainSettings
from batchseg.models.text import MASKCLIP_TEMPLATES
from batchseg.models.vocabulary import parse_classes
from batchseg.stages.pseudolabel_rounds import drift_reason, read_round_info, round_decision


def _config(out: Path, rounds: int = 3, **selftrain) -> PseudolabelConfig:
    labels = LabelSettings(vocabulary=parse_classes("cat,dog"), templates=MASKCLIP_TEMPLATES)
    return PseudolabelConfig(out=out, labels=labels, selftrain=SelfTrainSettings(**selftrain), rounds=rounds)


def _record(out: Path, round_index: int, anchor_agreement: float | None) -> None:
    write_json_atomic(selftrain_folder(out, round_index) / ROUND_FILE,
                      {"round": round_index, "stats": {"anchor_agreement": anchor_agreement}})


def test_the_default_keeps_a_later_round_only_if_it_holds_round_0s_surest_labels():
    assert SelfTrainSettings().drift_tolerance == 0.0


@pytest.mark.parametrize("before, now, tolerance, drifted", [
    (0.990, 0.990, 0.0, False),  # as many kept: not drift
    (0.990, 0.995, 0.0, False),
    (0.990, 0.9899, 0.0, True),  # fewer by any amount
    (0.990, 0.9885, 0.002, False),  # within the tolerance
    (0.990, 0.9875, 0.002, True),
    (0.990, 0.0, 1.0, False),  # 1 keeps every round
    (None, 0.5, 0.0, False),  # an older build's round before recorded nothing: no verdict
    (0.990, None, 0.0, False),
])
def test_drift_compares_with_the_round_before(tmp_path: Path, before, now, tolerance, drifted):
    config = _config(tmp_path, drift_tolerance=tolerance)
    _record(tmp_path, 1, before)
    reason = drift_reason(config, 2, {"anchor_agreement": now})
    assert (reason is not None) == drifted
    if drifted:
        assert reason.startswith("drifted: it keeps round 0's label on") and f"{before:.4f}" in reason


def test_round_1_is_never_drift(tmp_path: Path):
    _record(tmp_path, 0, 1.0)
    assert drift_reason(_config(tmp_path), 1, {"anchor_agreement": 0.1}) is None


@pytest.mark.parametrize("round_index, stats, stop_agreement, expected", [
    (0, {"agreement_with_previous": None}, 0.95, {"stop": False, "why": "round 0 is the labeller"}),
    (1, {"agreement_with_previous": 0.96}, 0.95, {"stop": True, "why": "converged: 0.9600 of cells"}),
    (1, {"agreement_with_previous": 0.94}, 0.95, {"stop": False, "why": "0.9400, below 0.95"}),
    (1, {"agreement_with_previous": 0.99}, None, {"stop": False, "why": "stopping rule off"}),
    (3, {"agreement_with_previous": 0.99, "anchor_agreement": 0.99}, 0.95, {"stop": False, "why": "last round"}),
    (2, {"agreement_with_previous": 0.99, "anchor_agreement": 0.98}, 0.95,
     {"stop": True, "discard": True, "why": "drifted"}),
])
def test_round_decisions(tmp_path: Path, round_index, stats, stop_agreement, expected):
    _record(tmp_path, 1, 0.99)
    decision = round_decision(_config(tmp_path, stop_agreement=stop_agreement), round_index, stats)
    assert decision["stop"] == expected["stop"]
    assert decision.get("discard", False) == expected.get("discard", False)
    assert expected["why"] in decision["why"]


def test_read_round_info(tmp_path: Path):
    assert read_round_info(tmp_path) is None
    _record(tmp_path, 1, 0.5)
    assert read_round_info(selftrain_folder(tmp_path, 1)) == {"round": 1, "stats": {"anchor_agreement": 0.5}}

