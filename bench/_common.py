"""Shared helpers for the scripts in ``bench/`` (not a benchmark itself).

Images, model settings from command-line choices, machine facts, peak RSS and a
plain-text table. The scripts run as ``.venv/bin/python bench/NAME.py``, so this
module is imported as ``_common`` (``bench/`` is ``sys.path[0]``).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

CLIP_CHOICES = ("ViT-B-16", "tiny")
SAM_CHOICES = ("vit_b", "tiny", "none")


# --------------------------------------------------------------------------- images


def parse_image_size(text: str) -> tuple[int, int] | None:
    """``"640x480"`` -> (640, 480); ``"small"`` -> None (batchseg.testing's 40-120 px images)."""
    if text == "small":
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be WIDTHxHEIGHT or 'small', got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"image size must be at least 16x16, got {text!r}")
    return (w, h)


def write_images(folder: Path, count: int, size: tuple[int, int] | None, seed: int = 0, start: int = 0) -> list[Path]:
    """Write images ``start .. start+count-1`` under ``folder``; each depends only on (seed, index).

    ``size`` None: ``batchseg.testing.write_image_folder`` (small PNG/JPEG shapes).
    Otherwise photo-like JPEGs (quality 90) of exactly ``size`` (width, height):
    a smooth gradient, a few shapes and sensor-like noise, so they decode and compress
    roughly like photos (about 100-200 KB at 640x480), spread over subfolders of 100.
    """
    if size is None:
        from batchseg.testing import write_image_folder

        return write_image_folder(folder, count, seed=seed, start=start)
    from PIL import Image, ImageDraw

    width, height = size
    folder = Path(folder)
    paths = []
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    for index in range(start, start + count):
        rng = np.random.default_rng([seed, index])
        c0, c1, c2 = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
        base = c0 + (c1 - c0) * xx + (c2 - c0) * yy
        base += rng.normal(0.0, 12.0, (height, width, 3)).astype(np.float32)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1 = x0 + int(rng.integers(width // 20 + 1, width // 3 + 2))
            y1 = y0 + int(rng.integers(height // 20 + 1, height // 3 + 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        sub = folder / f"d{index // 100:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{index:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelChoice:
    """What the command line asked for, and how to say it to ``batchseg embed``."""

    clip: str  # "ViT-B-16" | "tiny"
    sam: str  # "vit_b" | "tiny" | "none"
    precision: str
    canvas: int | None
    tiny_dir: Path | None  # where make_tiny_models wrote tiny CLIP / SAM, when used

    def settings(self):
        """The ``ModelSettings`` the scripts and the CLI arguments below both describe."""
        from batchseg.config import ModelSettings
        from batchseg.models.clip import ClipSpec
        from batchseg.models.sam import SamSpec

        if self.clip == "tiny":
            clip = ClipSpec(f"local-dir:{self.tiny_dir / 'tiny-clip'}")
        else:
            clip = ClipSpec(self.clip, None)  # pretrained None: random init (speed only)
        if self.sam == "none":
            sam = None
        elif self.sam == "tiny":
            sam = SamSpec("tiny", str(self.tiny_dir / "tiny-sam.safetensors"))
        else:
            sam = SamSpec(self.sam, None)  # random init
        return ModelSettings(clip=clip, sam=sam, clip_canvas=self.canvas, precision=self.precision)

    def cli_args(self) -> list[str]:
        """``batchseg embed`` options giving exactly ``self.settings()``."""
        if self.clip == "tiny":
            args = ["--clip-model", f"local-dir:{self.tiny_dir / 'tiny-clip'}"]
        else:
            args = ["--clip-model", self.clip, "--clip-pretrained", "random"]
        if self.sam == "none":
            args += ["--no-sam"]
        elif self.sam == "tiny":
            args += ["--sam-model", "tiny", "--sam-checkpoint", str(self.tiny_dir / "tiny-sam.safetensors")]
        else:
            args += ["--sam-model", self.sam, "--sam-checkpoint", "random"]
        if self.canvas is not None:
            args += ["--canvas", str(self.canvas)]
        return args + ["--precision", self.precision]


def add_model_options(parser: argparse.ArgumentParser, clip: str, sam: str, precision: str = "bf16") -> None:
    group = parser.add_argument_group("models (random init: no downloads, speed and memory only)")
    group.add_argument("--clip", choices=CLIP_CHOICES, default=clip,
                       help=f"CLIP: open_clip ViT-B-16 (random init) or batchseg's tiny test model (default {clip})")
    group.add_argument("--sam", choices=SAM_CHOICES, default=sam,
                       help=f"SAM: vit_b (random init), tiny, or none (default {sam})")
    group.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=precision,
                       help=f"forward precision (default {precision})")
    group.add_argument("--canvas", type=int, default=None, help="CLIP canvas (default: the model's own size)")


def model_choice(args: argparse.Namespace, workdir: Path) -> ModelChoice:
    tiny_dir = None
    if args.clip == "tiny" or args.sam == "tiny":
        from batchseg.testing import make_tiny_models

        tiny_dir = workdir / "models"
        if not (tiny_dir / "tiny-sam.safetensors").exists():
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # open_clip warns "no weights found" while it saves them
            try:
                make_tiny_models(tiny_dir)
            finally:
                root.setLevel(level)
    return ModelChoice(args.clip, args.sam, args.precision, args.canvas, tiny_dir)


def describe_models(models) -> list[tuple[str, str]]:
    """(name, facts) rows for a ``LoadedModels``: parameter counts and shapes actually used."""
    rows = []
    if models.clip is not None:
        clip = models.clip
        visual = sum(p.numel() for p in clip.model.visual.parameters())
        rows.append((
            "CLIP image tower",
            f"{visual / 1e6:.1f} M params, canvas {clip.canvas}, patch {clip.patch}, grid {clip.grid}, "
            f"dense {clip.dense_dim} ch, keys {clip.key_dim} ch",
        ))
    if models.sam is not None:
        sam = models.sam
        params = sum(p.numel() for p in sam.parameters())
        rows.append((
            "SAM image encoder",
            f"{params / 1e6:.1f} M params, canvas {sam.image_size}, embedding {tuple(sam.embed_shape)}",
        ))
    return rows


def setup_logging() -> None:
    """Warnings and errors only. Libraries log through the root logger (open_clip), which
    would otherwise also print every INFO line of the Dask scheduler and nannies that
    run inside this process (``silence_logs`` only quiets Dask's own handlers)."""
    import distributed  # noqa: F401 - sets up Dask's loggers first, so the levels below stick

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- machine, memory


def cores() -> int:
    """Cores batchseg itself counts (``os.cpu_count()``, as ``ClusterSettings.threads_per_worker``)."""
    return os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
        f"machine: {platform.node()}, {cpu_model()}, {cores()} cores (usable {usable}), "
        f"{platform.system()} {platform.release()}",
        f"software: python {platform.python_version()}, torch {torch.__version__}, load average (1/5/15 min) {load}",
    ]


def load_line() -> str:
    if not hasattr(os, "getloadavg"):
        return ""
    return "load average now: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: ``VmHWM`` from ``/proc/self/status``, the high-water mark of this process's
    own address space. Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries
    ``ru_maxrss`` across ``fork``/``exec``, so a subprocess or a spawned Dask worker
    reports at least its parent's peak at the time it was started (a worker spawned by
    a 1 GiB driver "peaks" at 1 GiB before doing anything). Elsewhere: ``ru_maxrss``
    (bytes on macOS, KiB on other systems).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def workdir(path: str | None, prefix: str) -> tuple[Path, bool]:
    """The folder to work in, and whether the script created it (and may delete it)."""
    if path:
        folder = Path(path).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return folder, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


# --------------------------------------------------------------------------- output


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes straight into RESULTS.md), columns padded for the terminal."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base > 0 else "n/a"
