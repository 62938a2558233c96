"""The README's main job (examples/demo.py) end to end on a handful of images."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import example_module

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_runs_end_to_end_prints_every_round_and_writes_overlays(tmp_path):
    command = [sys.executable, str(DEMO), "--images", "3", "--rounds", "1", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "the shipped toy models" in first.stdout
    for line in ("round 0  MaskCLIP alone", "round 0  MaskCLIP + SAM refinement", "round 1  self-training head",
                 "round 1  head + SAM refinement"):
        assert line in first.stdout
    assert "every step is at least as good" in first.stdout or "lower than the step before" in first.stdout
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 9  # 3 images x (round 0 MaskCLIP, round 0 SAM, last round)
    assert len(list((tmp_path / "build" / "eval").glob("*.json"))) == 1

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    for stage in ("embed", "pseudolabel", "evaluate"):  # the build skips every finished stage
        assert f"{stage}: up to date" in again.stdout, again.stdout
    assert "round 1  head + SAM refinement" in again.stdout  # the numbers are printed again
    assert len(list((tmp_path / "build" / "eval").glob("*.json"))) == 1


@pytest.mark.parametrize("args", [["--images", "0"], ["--rounds", "-1"]])
def test_demo_rejects_bad_counts(args, capsys):
    with example_module("demo") as demo, pytest.raises(SystemExit) as exit_info:
        demo.main(args)
    assert exit_info.value.code == 2
    assert "--images must be at least 1" in capsys.readouterr().err


def test_summary_lines_give_each_step_its_change_and_a_verdict(tmp_path):
    import json

    results = [{"round": 0, "source": "maskclip", "miou": 0.30, "pixel_accuracy": 0.8},
               {"round": 0, "source": "sam", "miou": 0.34, "pixel_accuracy": 0.8},
               {"round": 1, "source": "student", "miou": 0.32, "pixel_accuracy": 0.8}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"results": results}))
    with example_module("demo") as demo:
        lines = demo.summary_lines(path)
    assert "( +4.0 vs the step before)" in lines[1] and "( -2.0 vs the step before)" in lines[2]
    assert lines[-1].startswith("  lower than the step before: round 1")
    path.write_text(json.dumps({"results": results[:2]}))
    with example_module("demo") as demo:
        assert demo.summary_lines(path)[-1] == "  every step is at least as good as the one before it"
