"""Fixed costs of a rerun with nothing to do (issue 8, "Speed of the fixed costs"): target < 1 s.

A rerun of ``embed`` when no image is new, a rerun of ``pseudolabel`` when every round
is complete with the same settings, and a refused settings mismatch should cost about
as much as ``batchseg --help``: the driver must know there is nothing to do (or that
the settings contradict OUT) before it imports torch or open_clip, which alone take
several seconds (13+ s on a loaded machine).

The script builds one small world build once (toy CLIP + toy SAM from
``batchseg/assets``: ``embed``, then ``pseudolabel`` with one self-training round),
then times each case below as a fresh ``python -m batchseg ...`` subprocess, the
median of ``--repeats`` (3) runs, and checks each exit code:

* ``batchseg --help`` (interpreter start, click: the floor);
* ``embed`` rerun, nothing new (exit 0, nothing computed);
* ``embed`` refused: another ``--precision`` than the build's (exit 2);
* ``pseudolabel`` rerun, every round complete with the same settings (exit 0, all skipped);
* ``pseudolabel`` refused: ``--dense-head proxy-sam --no-sam`` (the head needs the
  SAM embeddings it was told not to use; exit 2).

It also says whether each case imported torch (``-X importtime`` of the same command).

    .venv/bin/python bench/noop_rerun.py                # 8 images, median of 3
    .venv/bin/python bench/noop_rerun.py --images 50 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="world images in the build (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported (default 3)")
    parser.add_argument("--workdir", default=None, help="folder for the build (default: a new temporary folder)")
    return parser.parse_args(argv)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _batchseg(args: list[str], importtime: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "batchseg", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT)


def _build(root: Path, images: int) -> tuple[list[str], list[str]]:
    """Write the world, embed and pseudolabel it once; return the two commands' arguments."""
    from batchseg.assets import TOY_CLIP_DIR, TOY_SAM_CHECKPOINT
    from batchseg.world import write_world

    write_world(root / "world", images, seed=3, max_side=96)
    out = root / "build"
    embed = ["embed", str(root / "world" / "images"), str(out), "--clip-model", f"local-dir:{TOY_CLIP_DIR}",
             "--sam-model", "tiny", "--sam-checkpoint", str(TOY_SAM_CHECKPOINT), "--precision", "fp32",
             "--workers", "1", "--threads", "1", "--quiet"]
    label = ["pseudolabel", str(out), "--vocab", str(root / "world" / "classes.txt"), "--background",
             "--points-per-side", "4", "--rounds", "1", "--epochs", "1", "--stop-agreement", "1",
             "--workers", "1", "--threads", "1", "--quiet"]
    for args in (embed, label):
        tick = time.perf_counter()
        done = _batchseg(args)
        if done.returncode != 0:
            sys.exit(f"building failed: batchseg {' '.join(args)}\n{done.stdout}\n{done.stderr}")
        print(f"built: batchseg {args[0]} in {time.perf_counter() - tick:.1f} s")
    return embed, label


def _cases(embed: list[str], label: list[str]) -> list[tuple[str, list[str], int, str]]:
    """(name, arguments, expected exit code, text the output must contain)."""
    precision = embed.index("--precision") + 1
    other_precision = [*embed[:precision], "bf16", *embed[precision + 1:]]
    return [
        ("batchseg --help", ["--help"], 0, "Stages"),
        ("embed rerun, nothing new", embed, 0, "0 computed"),
        ("embed refused: other --precision", other_precision, 2, "different embedding settings"),
        ("pseudolabel rerun, all rounds complete", label, 0, "already complete, skipped"),
        ("pseudolabel refused: --dense-head proxy-sam --no-sam", [*label, "--dense-head", "proxy-sam", "--no-sam"],
         2, "proxy-sam"),
    ]


def _imports_torch(args: list[str]) -> bool:
    done = _batchseg(args, importtime=True)
    # -X importtime lines: "import time: SELF | CUMULATIVE | <indent>module"
    return any(line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "torch"
               for line in done.stderr.splitlines())


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit.strip() + (" (uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import _common as common

    root = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="batchseg-noop-"))
    root.mkdir(parents=True, exist_ok=True)
    embed, label = _build(root, args.images)
    rows = []
    for name, case, code, expect in _cases(embed, label):
        times = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            done = _batchseg(case)
            times.append(time.perf_counter() - tick)
            said = done.stdout + done.stderr
            if done.returncode != code or expect not in said:
                sys.exit(f"{name}: exit {done.returncode} (expected {code}), output lacks {expect!r}:\n{said}")
        median = statistics.median(times)
        rows.append((name, f"{median:.2f}", f"{min(times):.2f}–{max(times):.2f}", code,
                     "yes" if _imports_torch(case) else "no", "met" if median < TARGET_S else "MISSED"))

    print()
    for line in common.machine_lines():
        print(line)
    print(f"commit: {_git_commit()}; build: {args.images} world images, toy CLIP (ViT) + toy SAM, "
          f"rounds 0 and 1; median of {args.repeats} fresh subprocesses per case")
    print(common.load_line() + " (shared machine: other jobs ran alongside)")
    print()
    print(common.table(["case", "median s", "range s", "exit", "imports torch", f"target < {TARGET_S:.0f} s"], rows))


if __name__ == "__main__":
    main()
