"""The README's main job on a fresh machine: no downloads, a local Dask cluster, local files.

Generates a small folder of the synthetic world (shapes on textures, with ground
truth), then runs the real CLI on it with the small models this project ships:

    batchseg embed       demo-out/world/images demo-out/build ...
    batchseg pseudolabel demo-out/build --vocab demo-out/world/classes.txt --background --rounds 2
    batchseg evaluate    demo-out/build --gt demo-out/world/gt

and leaves overlay images (image + labels + class names) in demo-out/overlays/.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "demo-out"
IMAGES = 16
SEED = 4242  # never used for training the toy models


def _run(*args: str) -> None:
    print("\n$ batchseg " + " ".join(args), flush=True)
    code = subprocess.call([sys.executable, "-m", "batchseg", *args])
    if code != 0:
        sys.exit(code)


def _models(root: Path) -> tuple[str, str, str]:
    from batchseg.assets import TOY_CLIP_DIR, TOY_SAM_CHECKPOINT, toy_models_available
    from batchseg.testing import make_tiny_models

    if toy_models_available():
        return f"local-dir:{TOY_CLIP_DIR}", str(TOY_SAM_CHECKPOINT), "the shipped toy models"
    tiny = make_tiny_models(root / "random-models")
    return tiny.clip_option, str(tiny.sam_checkpoint), "RANDOM-INIT tiny models (toy models not shipped yet: expect chance-level labels)"


def _overlays(build: Path, world: Path, rounds: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    from batchseg.io.tables import read_labels, read_manifest
    from batchseg.report.overlay import save_overlay

    manifest = [r for r in read_manifest(build).to_pylist() if r["status"] == "ok"][:3]
    written = []
    views = [(0, "maskclip"), (0, "sam"), (rounds, "sam")]
    tables = {k: read_labels(build, k).to_pylist() for k in {v[0] for v in views}}
    for row in manifest:
        image = np.asarray(Image.open(world / "images" / row["path"]).convert("RGB"))
        for round_index, source in views:
            rows = [r for r in tables[round_index]
                    if r["image_id"] == row["image_id"] and r["kind"] == "semantic" and r["source"] == source]
            stem = Path(row["path"]).stem
            written.append(save_overlay(image, rows, ROOT / "overlays" / f"{stem}-round{round_index}-{source}.png"))
    return written


def main() -> int:
    from batchseg.world import write_world

    world, build = ROOT / "world", ROOT / "build"
    if not (world / "classes.txt").exists():
        write_world(world, IMAGES, seed=SEED)
    clip, sam, what = _models(ROOT)
    print(f"demo: {IMAGES} synthetic images in {world}; models: {what}")
    rounds = 2
    _run("embed", str(world / "images"), str(build), "--clip-model", clip, "--sam-model", "tiny",
         "--sam-checkpoint", sam, "--workers", "1", "--shard-size", "8", "--precision", "fp32")
    _run("pseudolabel", str(build), "--vocab", str(world / "classes.txt"), "--background", "--rounds", str(rounds),
         "--points-per-side", "16", "--shard-size", "8")
    _run("evaluate", str(build), "--gt", str(world / "gt"))
    overlays = _overlays(build, world, rounds)
    print(f"\noverlays (image, labels, class names): {overlays[0].parent}/ ({len(overlays)} files)")
    print("run `make demo` again: every stage is incremental and skips finished work.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
