"""The README's main job on a fresh machine: no downloads, a local Dask cluster, local files.

Generates a small image folder and small models (random-init until the project's
trained toy models ship), then runs the real CLI on them:

    batchseg embed demo-out/images demo-out/build --clip-model local-dir:... --sam-model tiny ...

and shows what landed in the output folder.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent / "demo-out"


def main() -> int:
    from batchseg.io.tables import read_manifest
    from batchseg.testing import make_tiny_models, write_image_folder

    images, build = ROOT / "images", ROOT / "build"
    if not images.exists():
        write_image_folder(images, 24, seed=0)
    from batchseg.testing import TinyModels

    models = TinyModels(ROOT / "models" / "tiny-clip", ROOT / "models" / "tiny-sam.safetensors")
    if not models.sam_checkpoint.exists():
        models = make_tiny_models(ROOT / "models")
    command = [
        sys.executable, "-m", "batchseg", "embed", str(images), str(build),
        "--clip-model", models.clip_option, "--canvas", "64",
        "--sam-model", "tiny", "--sam-checkpoint", str(models.sam_checkpoint),
        "--workers", "2", "--shard-size", "8",
    ]
    print("$ batchseg " + " ".join(command[3:]), flush=True)
    code = subprocess.call(command)
    if code != 0:
        return code
    manifest = read_manifest(build)
    print(f"\nmanifest: {manifest.num_rows} rows; first three:")
    for row in manifest.slice(0, 3).to_pylist():
        print(f"  {row['path']}: {row['status']} {row['width']}x{row['height']} -> zarr row {row['zarr_row']}")
    print("\nrun `make demo` again: the rerun is incremental and computes nothing new.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
