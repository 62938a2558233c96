"""Pseudolabel's decisions about rounds, from what each round recorded (no model, no torch).

Whether a stored round is resumed, kept for added images, or recomputed (:func:`round_state`);
and whether self-training goes on after a round, stops, or sets the round aside
(:func:`round_decision`). Each decision is written to the round's ``_round.json`` with why.
"""
from __future__ import annotations

from pathlib import Path

from batchseg.config import PseudolabelConfig, must_retrain
from batchseg.io.build_info import ROUND_FILE, read_json
from batchseg.io.tables import selftrain_folder

HEAD_FILE = "head.safetensors"  # the self-training head of a round, in selftrain/round=K/


def read_round_info(folder: Path) -> dict | None:
    """``folder/_round.json`` (a ``selftrain/round=K`` folder); None when absent."""
    path = folder / ROUND_FILE
    return read_json(path) if path.is_file() else None


def round_state(config: PseudolabelConfig, round_index: int, info: dict | None, key: str, images_key: str,
                 images: int) -> str:
    """What a round does with what it stored: "same" (complete, or resume what a killed run
    left), "keep" (its head is kept and labels the images that have no rows yet: a round
    >= 1 whose image set changed, within ``config.retrain``; see
    ``batchseg.config.must_retrain``), or "recompute" (settings changed, the round before
    it retrained, or the retrain policy says so)."""
    if not info or info.get("key") != key:
        return "recompute"
    if round_index == 0:
        return "same"
    trained = bool(info.get("trained")) and (selftrain_folder(config.out, round_index) / HEAD_FILE).exists()
    if trained and info.get("previous_trained_run") != previous_trained_run(config.out, round_index):
        return "recompute"  # the round before retrained since: this head learnt from labels that are gone
    trained_on = info.get("trained_images") or info.get("images") or 0
    if info.get("images_key") == images_key:
        # A kept head that the policy now wants retrained (e.g. retrain "always" after a "fraction" run).
        stale = trained and info.get("complete") and trained_on != images and must_retrain(
            config.retrain, config.retrain_fraction, trained_on, images)
        return "recompute" if stale else "same"
    if trained and info.get("complete") and not must_retrain(config.retrain, config.retrain_fraction, trained_on,
                                                             images):
        return "keep"
    return "recompute"


def previous_trained_run(out: Path, round_index: int) -> str | None:
    """The run that trained round ``round_index - 1``'s head (None for round 0 or older builds)."""
    if round_index < 2:
        return None
    info = read_round_info(selftrain_folder(out, round_index - 1))
    return (info or {}).get("trained_run")


def round_decision(config: PseudolabelConfig, round_index: int, stats: dict) -> dict:
    """Whether self-training goes on after this round, and why (recorded in ``_round.json``).

    There is no ground truth to check against, so the rules watch the labels themselves:

    * drift (rounds >= 2): a round that overturns more of the labeller's most confident
      cells than the round before did (``anchor_agreement`` lower by more than
      ``drift_tolerance``) is learning its own mistakes; it is discarded and the round
      before is the result;
    * convergence: once a round changes fewer than ``1 - stop_agreement`` of the cells of
      the round before, more rounds only re-learn the same labels, so the rounds stop.
    """
    drift = drift_reason(config, round_index, stats)
    if drift is not None:
        return {"stop": True, "discard": True, "why": drift}
    threshold = config.selftrain.stop_agreement
    agreement = stats.get("agreement_with_previous")
    if round_index == config.rounds:
        return {"stop": False, "why": "last round requested"}
    if round_index == 0:
        return {"stop": False, "why": "round 0 is the labeller; self-training follows"}
    if threshold is not None and agreement is not None and agreement >= threshold:
        return {"stop": True, "why": f"converged: {agreement:.4f} of cells agree with round {round_index - 1} "
                                     f"(stop_agreement {threshold})"}
    shown = "n/a" if agreement is None else f"{agreement:.4f}"
    if threshold is None:
        return {"stop": False, "why": f"agreement with round {round_index - 1} is {shown}; stopping rule off"}
    return {"stop": False, "why": f"agreement with round {round_index - 1} is {shown}, below {threshold}"}


def drift_reason(config: PseudolabelConfig, round_index: int, stats: dict) -> str | None:
    """Why round ``round_index`` drifted from round 0's most confident cells, or None."""
    if round_index < 2:
        return None  # round 1 learns from the labeller itself
    now = stats.get("anchor_agreement")
    before = ((read_round_info(selftrain_folder(config.out, round_index - 1)) or {}).get("stats") or {}).get(
        "anchor_agreement")
    tolerance = config.selftrain.drift_tolerance
    if now is None or before is None or now >= before - tolerance:
        return None
    return (f"drifted: it keeps round 0's label on {now:.4f} of round 0's most confident cells, round "
            f"{round_index - 1} on {before:.4f} (drift_tolerance {tolerance})")
