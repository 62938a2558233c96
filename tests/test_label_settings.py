"""LabelSettings choices that change round 0: key smoothing's auto rule."""
from __future__ import annotations

import pytest

from batchseg.config import LabelSettings, key_smoothing_choice
from batchseg.errors import UsageError
from batchseg.models.vocabulary import parse_classes


def _settings(**changes) -> LabelSettings:
    return LabelSettings(vocabulary=parse_classes("cat,dog"), templates=("a photo of a {}.",), **changes)


@pytest.mark.parametrize("choice, sam_votes, smooths", [
    ("auto", False, True), ("auto", True, False),
    ("on", False, True), ("on", True, True),
    ("off", False, False), ("off", True, False),
])
def test_key_smoothing_auto_smooths_only_without_sam(choice, sam_votes, smooths):
    assert _settings(key_smoothing=choice).smooths_keys(sam_votes) is smooths


@pytest.mark.parametrize("value, flag, expected", [
    (None, False, "auto"), ("auto", False, "auto"), ("on", False, "on"), (None, True, "off"),
    ("auto", True, "off"), ("off", True, "off"),
])
def test_key_smoothing_choice_reads_the_old_flag(value, flag, expected):
    assert key_smoothing_choice(value, flag) == expected


def test_key_smoothing_contradiction_and_bad_value_are_usage_errors():
    with pytest.raises(UsageError, match="--no-key-smoothing contradicts --key-smoothing on"):
        key_smoothing_choice("on", True)
    with pytest.raises(UsageError, match="--key-smoothing must be one of auto, on, off, got 'yes'"):
        _settings(key_smoothing="yes").validate()


def test_key_smoothing_is_part_of_the_recorded_settings():
    assert _settings().to_json()["key_smoothing"] == "auto"
    assert _settings(key_smoothing="on").to_json() != _settings().to_json()


@pytest.mark.parametrize("weight, recorded", [(0.5, None), (0.0, 0.0), (0.3, 0.3), (1.0, 1.0)])
def test_fine_weight_is_recorded_unless_it_is_the_weight_older_records_mean(weight, recorded):
    """Records from before --fine-weight (no fine canvas was possible) keep their round keys."""
    record = _settings(fine_weight=weight).to_json()
    assert record.get("fine_weight") == recorded
    assert (record == _settings().to_json()) == (recorded is None)

