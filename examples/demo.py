"""The README's main job on a fresh machine: no downloads, a local Dask cluster, local files.

Generates a small folder of the synthetic world (shapes on textures, with ground
truth), then builds it with the pipeline file the repo ships (``pipelines/demo.yaml``)
through the real CLI, with the small models this project ships (``batchseg/assets``:
a toy CLIP and a toy SAM, trained on that world only):

    batchseg build pipelines/demo.yaml --set sources=demo-out/world/images --set out=demo-out/build ...

which embeds, pseudo-labels (round 0 and the self-training rounds) and evaluates
against the world's ground truth on one local Dask cluster. It prints the mIoU of
each round and leaves overlay images (image + labels + class names) in
demo-out/overlays/. Running it again skips finished work (every stage is up to date).

    python examples/demo.py                       # 16 images -> demo-out/
    python examples/demo.py --images 4 --out /tmp/demo --rounds 1
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "demo-out"
PIPELINE = REPO / "pipelines" / "demo.yaml"
SEED = 4242  # never used for training or evaluating the toy models


def _run(*args: str) -> None:
    print("\n$ batchseg " + " ".join(args), flush=True)
    code = subprocess.call([sys.executable, "-m", "batchseg", *args])
    if code != 0:
        sys.exit(code)


def _models(root: Path) -> tuple[str, str, str]:
    from batchseg.assets import TOY_CLIP_CNN_DIR, TOY_CLIP_DIR, TOY_SAM_CHECKPOINT, toy_models_available
    from batchseg.testing import make_tiny_models

    if toy_models_available():
        # The ConvNeXt toy CLIP knows shape as well as colour; the ViT one mostly colour (cards).
        clip = TOY_CLIP_CNN_DIR if (TOY_CLIP_CNN_DIR / "open_clip_model.safetensors").exists() else TOY_CLIP_DIR
        return f"local-dir:{clip}", str(TOY_SAM_CHECKPOINT), f"the shipped toy models ({clip.name} + toy-sam)"
    tiny = make_tiny_models(root / "random-models")
    return tiny.clip_option, str(tiny.sam_checkpoint), "RANDOM-INIT tiny models (toy models missing: expect chance-level labels)"


def _overlays(root: Path, build: Path, world: Path, rounds: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    from batchseg.io.tables import read_labels, read_manifest
    from batchseg.report.overlay import save_overlay

    manifest = [r for r in read_manifest(build).to_pylist() if r["status"] == "ok"][:3]
    written = []
    # The last round written: self-training may have stopped before --rounds (its _round.json says why).
    last = max(k for k in range(rounds + 1) if read_labels(build, k).num_rows)
    views = [(0, "maskclip"), (0, "sam"), (last, "sam")]
    tables = {k: read_labels(build, k).to_pylist() for k in {v[0] for v in views}}
    for row in manifest:
        image = np.asarray(Image.open(world / "images" / row["path"]).convert("RGB"))
        for round_index, source in views:
            rows = [r for r in tables[round_index]
                    if r["image_id"] == row["image_id"] and r["kind"] == "semantic" and r["source"] == source]
            stem = Path(row["path"]).stem
            written.append(save_overlay(image, rows, root / "overlays" / f"{stem}-round{round_index}-{source}.png"))
    return written


def summary_lines(eval_json: Path) -> list[str]:
    """One line per round and source of an evaluate JSON (already in round, source order),
    each with its change against the stage before it, then a verdict line."""
    from batchseg.stages.evaluate import describe_source

    results = json.loads(eval_json.read_text())["results"]
    lines, previous, worse = [], None, []
    for r in results:
        step = "" if previous is None else f"   ({100 * (r['miou'] - previous):+5.1f} vs the step before)"
        name = describe_source(r["round"], r["source"])
        lines.append(f"  round {r['round']}  {name:<26} mIoU {100 * r['miou']:5.1f}%   "
                     f"pixel accuracy {100 * r['pixel_accuracy']:5.1f}%{step}")
        if previous is not None and r["miou"] < previous - 0.005:
            worse.append(f"round {r['round']} {name}")
        previous = r["miou"]
    if worse:
        lines.append("  lower than the step before: " + "; ".join(worse)
                     + " (measured, not hidden: see bench/RESULTS.md for why)")
    else:
        lines.append("  every step is at least as good as the one before it")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="batchseg's offline demo on the synthetic world")
    parser.add_argument("--images", type=int, default=16, help="synthetic images to generate (default 16)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="self-training rounds (default 1: on 16 images a second round over-fits, bench/RESULTS.md)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"working folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 0:
        parser.error("--images must be at least 1 and --rounds at least 0")
    from batchseg.world import write_world

    root = args.out
    world, build = root / "world", root / "build"
    marker = world / ".images"
    if not marker.exists() or marker.read_text() != f"{args.images} {SEED}":
        # Another image count: start over rather than mix the old images into this demo.
        shutil.rmtree(world, ignore_errors=True)
        shutil.rmtree(build, ignore_errors=True)
        write_world(world, args.images, seed=SEED)
        marker.write_text(f"{args.images} {SEED}")
    clip, sam, what = _models(root)
    print(f"demo: {args.images} synthetic images in {world}; models: {what}")
    # The pipeline file names demo-out/ next to the repo; --set points it at this run's folders.
    _run("build", str(PIPELINE), "--set", f"sources={world / 'images'}", "--set", f"out={build}",
         "--set", f"models.clip-model={clip}", "--set", f"models.sam-checkpoint={sam}",
         "--set", f"pseudolabel.vocab={world / 'classes.txt'}", "--set", f"pseudolabel.rounds={args.rounds}",
         "--set", f"evaluate.gt={world / 'gt'}")
    latest = max((build / "eval").glob("*.json"))
    print("\nmIoU over 12 shape classes + background, against the world's exact ground truth:")
    print("\n".join(summary_lines(latest)))
    print(f"(self-training learns from these {args.images} images only; bench/quality.py measures every head, "
          "SAM and each round on 200 images of two world variants: bench/RESULTS.md)")
    overlays = _overlays(root, build, world, args.rounds)
    print(f"\noverlays (image, labels, class names): {overlays[0].parent}/ ({len(overlays)} files)")
    print(f"run it again: every stage is incremental and skips finished work (run records: {build / 'runs'}/).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
