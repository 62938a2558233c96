"""`batchseg qc` quality and speed: injected outliers and near-copies among world images.

Quality (``--images`` world images of ``--seed`` plus about ``--contamination`` of them
again as injected outliers, plus ``--near`` near-copies): the folder is embedded with
the shipped toy CLIP (``batchseg/assets/toy-clip``, ``local-dir:``, no SAM), then
``batchseg qc --method rglasso --compare mogaal,mcd --contamination TRUE`` runs on it
through the CLI. Outlier kinds, in turn: blank frames, near-constant frames, noise,
colour-inverted world images, heavy JPEG damage, off-domain text and gradients.
Near-copies: centre crops (90% of each side) and JPEG re-encodes (quality 80) of
world images. Reported:

- per method: AUROC of the outlier score (world images 0, injected outliers 1; the
  near-copies are left out: they are neither) and precision among the top-k scores,
  k = the true number of outliers; pyod's ``MO_GAAL`` on the same reduced coordinates
  (its raw ``decision_function`` = D(x), and 1 − that), when pyod is installed;
- near-duplicates: precision and recall of ``batchseg qc``'s flags (a flag is right
  when a near-copy points at its original), and a sweep of the threshold over the
  brute-force pairs of the stored embeddings.

Speed (synthetic unit embeddings, ``--dim``, clustered, 1 thread): seconds to fit the
reduction and each detector on the fit sample (at most 20,000 rows), to score every
row with all three, and for the exact all-pairs near-duplicate search; peak RSS.

    .venv/bin/python bench/qc.py                       # 150 world images, 10k and 100k synthetic
    .venv/bin/python bench/qc.py --images 40 --sizes 2000 --skip-pyod   # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common as common
import numpy as np

# No training run or other benchmark uses these: 7100 chose dense-grid's 4 x 4 grid and the
# dense configuration's --dup-threshold 0.98; the default, 7200, measures them unseen.
TUNING_SEED = 7100
WORLD_SEED = 7200
KINDS = ("blank", "near_constant", "noise", "inverted", "jpeg_damage", "text", "gradient")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150, help="world images (default 150)")
    parser.add_argument("--contamination", type=float, default=0.1, help="injected outliers per world image (default 0.1)")
    parser.add_argument("--near", type=int, default=20, help="near-copies of world images (default 20)")
    parser.add_argument("--seed", type=int, default=WORLD_SEED, help=f"world seed (default {WORLD_SEED})")
    parser.add_argument("--sizes", default="10000,100000", help="synthetic embedding counts (default 10000,100000)")
    parser.add_argument("--dup-sizes", default="10000,30000", help="counts for the all-pairs search (default 10000,30000)")
    parser.add_argument("--dim", type=int, default=512, help="synthetic embedding dimension (default 512, ViT-B/16's)")
    parser.add_argument("--skip-pyod", action="store_true", help="do not run pyod's MO_GAAL")
    parser.add_argument("--bookkeeping", type=int, default=1_000_000,
                        help="files for the per-file memory measurement (default 1000000; 0: skip)")
    parser.add_argument("--bookkeeping-only", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--workdir", default=None, help="keep images and build here (default: a temp folder, deleted)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- images


def _outlier(kind: str, index: int, world_image: np.ndarray, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    h, w = world_image.shape[:2]
    if kind == "blank":
        return Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    if kind == "near_constant":
        base = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.int16) + rng.integers(-6, 7, (h, w, 3))
        return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if kind == "inverted":
        return Image.fromarray(255 - world_image)
    if kind == "jpeg_damage":
        small = Image.fromarray(world_image).resize((max(8, w // 8), max(8, h // 8)))
        return ("jpeg", small.resize((w, h)), 2)
    if kind == "text":
        image = Image.new("RGB", (w, h), (250, 250, 245))
        draw = ImageDraw.Draw(image)
        for line in range(0, h, 12):
            draw.text((4, line), "lorem ipsum dolor sit amet %d" % (index + line), fill=(10, 10, 10))
        return image
    if kind == "gradient":
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = np.linspace(0.0, 1.0, w)[None, :, None]
        return Image.fromarray(np.broadcast_to(c0 + (c1 - c0) * t, (h, w, 3)).astype(np.uint8))
    raise ValueError(kind)


def write_folder(src: Path, args) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """World images, outliers and near-copies under ``src``; returns (outlier paths,
    {near-copy path: original path}, {path: kind})."""
    from PIL import Image

    from batchseg.world import write_world

    world = write_world(src.parent / "world", args.images, args.seed, ground_truth=False)
    (src / "world").mkdir(parents=True)
    for path in world:
        shutil.copy(path, src / "world" / path.name)
    rng = np.random.default_rng(args.seed)
    outliers, kinds = [], {}
    (src / "outliers").mkdir()
    for index in range(max(1, round(args.contamination * args.images))):
        kind = KINDS[index % len(KINDS)]
        made = _outlier(kind, index, np.array(Image.open(world[index % len(world)])), rng)
        rel = f"outliers/{kind}_{index:03d}" + (".jpg" if isinstance(made, tuple) else ".png")
        if isinstance(made, tuple):
            made[1].save(src / rel, quality=made[2])
        else:
            made.save(src / rel)
        outliers.append(rel)
        kinds[rel] = kind
    near = {}
    (src / "near").mkdir()
    for index in range(args.near):
        original = world[(7 * index + 3) % len(world)]
        image = Image.open(original).convert("RGB")
        if index % 2 == 0:
            w, h = image.size
            dw, dh = round(w * 0.05), round(h * 0.05)
            rel = f"near/crop_{index:03d}.png"
            image.crop((dw, dh, w - dw, h - dh)).save(src / rel)
        else:
            rel = f"near/jpeg_{index:03d}.jpg"
            image.save(src / rel, quality=80)
        near[rel] = f"world/{original.name}"
        kinds[rel] = rel.split("/")[1].split("_")[0]
    return outliers, near, kinds


def _run(args: list[str]) -> float:
    env = {**os.environ, **common.thread_env(1), "PYTHONPATH": str(common.ROOT)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "batchseg", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"qc bench: batchseg {args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- quality


def _precision_at(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="stable")[:k]
    return float(labels[top].mean())


CONFIGS = (
    ("global", ["--dup-threshold", "0.97"]),  # the defaults
    ("dense", ["--features", "dense-mean", "--dup-features", "dense-grid", "--dup-threshold", "0.98"]),
)


def _stored_features(out: Path, paths: list[str], name: str) -> np.ndarray:
    """Feature ``name`` of ``paths`` (unit rows), computed from the store as qc does."""
    from batchseg.config import read_build_file
    from batchseg.io.store import iter_rows
    from batchseg.io.tables import read_manifest
    from batchseg.qc.features import STORE_ARRAY, compute_features

    manifest = {r["path"]: r for r in read_manifest(out).to_pylist()}
    geometry = read_build_file(out)["embed"]["geometry"]
    stored = np.concatenate(list(iter_rows(out, STORE_ARRAY[name], [manifest[p]["zarr_row"] for p in paths])))
    valid = [(manifest[p]["clip_valid_h"], manifest[p]["clip_valid_w"]) for p in paths]
    return compute_features(name, stored, valid, geometry["clip_canvas"], geometry["clip_grid"])


def _evaluate(args, out: Path, config: str, contamination: float, outliers, near, kinds) -> dict:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from batchseg.io.qc_table import read_model_files
    from batchseg.io.tables import read_manifest
    from batchseg.qc.model import QcModel

    table = pd.read_parquet(out / "qc").set_index("path")
    model = QcModel.from_parts(*read_model_files(out))
    evaluated = table[~table.index.str.startswith("near/")]
    labels = np.asarray(evaluated.index.str.startswith("outliers/"), dtype=int)
    k = int(labels.sum())
    rows, results = [], {"reduced_dim": model.reduction.dim}
    for method in ("rglasso", "mogaal", "mcd"):
        scores = evaluated[f"score_{method}"].to_numpy()
        auroc, precision = roc_auc_score(labels, scores), _precision_at(labels, scores, k)
        rows.append((f"batchseg {method}", f"{auroc:.3f}", f"{precision:.3f}"))
        results[method] = {"auroc": auroc, "precision_at_k": precision}
    flagged = evaluated["outlier"].to_numpy()
    results["rglasso_flags"] = {"flagged": int(flagged.sum()), "true_flagged": int((flagged & (labels == 1)).sum())}
    if not args.skip_pyod:
        try:
            from pyod.models.mo_gaal import MO_GAAL
        except ImportError as exc:
            rows.append(("pyod MO_GAAL", f"not run: {exc}", ""))
        else:
            import torch

            torch.manual_seed(0)
            np.random.seed(0)
            z = model.reduction.project(_stored_features(out, list(evaluated.index), model.settings.features))
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per epoch
                detector = MO_GAAL(contamination=contamination).fit(z)
            raw = detector.decision_function(z)
            for name, values in (("pyod MO_GAAL, raw score = D(x)", raw), ("pyod MO_GAAL, 1 - raw", 1.0 - raw)):
                auroc, precision = roc_auc_score(labels, values), _precision_at(labels, values, k)
                rows.append((name, f"{auroc:.3f}", f"{precision:.3f}"))
                results[name] = {"auroc": auroc, "precision_at_k": precision}
    print(f"\n[{config}] features {model.settings.features}, reduced dim {model.reduction.dim} "
          f"({model.reduction.explained:.3f} of the variance); outliers among {len(evaluated)} images:")
    print(common.table(["method", "AUROC", f"precision@{k}"], rows))
    ranks = evaluated["score_rglasso"].rank(ascending=False)
    per_kind = [(kind, " ".join(str(int(ranks[p])) for p in outliers if kinds[p] == kind)) for kind in KINDS]
    print(f"rglasso rank of each injected outlier (1 = most outlying, of {len(evaluated)}):")
    print(common.table(["kind", "ranks"], per_kind))

    # Near-duplicates: the CLI's flags as pairs (member, the image it is flagged a copy of),
    # right when that is a planted (copy, original) pair in either direction.
    manifest = {r["path"]: r for r in read_manifest(out).to_pylist()}
    path_of = {manifest[p]["image_id"]: p for p in table.index}
    truth = {frozenset((c, o)) for c, o in near.items()}
    flagged_near = table[table["near_duplicate_of"].notna()]
    predicted = {frozenset((p, path_of[row["near_duplicate_of"]])) for p, row in flagged_near.iterrows()}
    right = len(predicted & truth)
    precision = right / len(predicted) if predicted else float("nan")
    results["near_duplicates"] = {"features": model.settings.dup_features, "threshold": model.settings.dup_threshold,
                                  "flagged": len(flagged_near), "right": right, "precision": precision,
                                  "recall": right / len(truth)}
    print(f"near-duplicates (--dup-features {model.settings.dup_features} --dup-threshold "
          f"{model.settings.dup_threshold}): {len(flagged_near)} flagged, {right} of them as a copy of their "
          f"planted partner: precision {precision:.3f}, recall {right / len(truth):.3f}")
    return results


def _sweep(out: Path, near: dict[str, str]) -> dict:
    """Pairwise precision/recall of the near-duplicate definition over thresholds, per feature."""
    from batchseg.io.tables import read_manifest
    from batchseg.qc.duplicates import brute_force_pairs

    paths = sorted(r["path"] for r in read_manifest(out).to_pylist() if r["status"] == "ok")
    index = {p: i for i, p in enumerate(paths)}
    truth = {tuple(sorted((index[c], index[o]))) for c, o in near.items()}
    rows, results = [], {}
    for name in ("global", "dense-mean", "dense-grid"):
        unit = _stored_features(out, paths, name)
        for threshold in (0.95, 0.97, 0.98, 0.99, 0.995):
            pairs = brute_force_pairs(unit, threshold)
            tp = len(pairs & truth)
            precision = tp / len(pairs) if pairs else float("nan")
            rows.append((name, threshold, len(pairs), tp, f"{precision:.3f}", f"{tp / len(truth):.3f}"))
            results[f"{name} {threshold}"] = {"pairs": len(pairs), "true": tp}
    print("\nnear-duplicate pairs over all images (truth: the planted copy-original pairs):")
    print(common.table(["features", "cosine >=", "pairs", "true pairs", "precision", "recall"], rows))
    return results


def quality(args, work: Path) -> dict:
    from batchseg.assets import TOY_CLIP_DIR

    src, out = work / "src", work / "out"
    outliers, near, kinds = write_folder(src, args)
    contamination = len(outliers) / (args.images + len(outliers))
    embed_s = _run(["embed", str(src), str(out), "--clip-model", f"local-dir:{TOY_CLIP_DIR}", "--no-sam",
                    "--precision", "fp32", "--workers", "1", "--threads", "1", "--quiet"])
    print(f"\n{args.images} world images (seed {args.seed}) + {len(outliers)} injected outliers "
          f"({', '.join(KINDS)}, in turn) + {len(near)} near-copies (crops, re-encodes); toy CLIP embed {embed_s:.1f} s")
    results = {"contamination": contamination, "outliers": len(outliers), "world": args.images,
               "near": len(near), "embed_seconds": embed_s}
    for config, extra in CONFIGS:
        seconds = _run(["qc", str(out), "--method", "rglasso", "--compare", "mogaal,mcd", "--refit",
                        "--contamination", f"{contamination:.6f}", "--threads", "1", "--quiet", *extra])
        results[config] = _evaluate(args, out, config, contamination, outliers, near, kinds)
        results[config]["qc_seconds"] = seconds
        print(f"batchseg qc {' '.join(extra)}: {seconds:.1f} s (process start, fit of all three, scoring)")
    results["sweep"] = _sweep(out, near)
    return results


# --------------------------------------------------------------------------- speed


def _synthetic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim)).astype(np.float32)
    rows = centres[rng.integers(0, 50, n)] + rng.normal(scale=0.8, size=(n, dim)).astype(np.float32)
    rows[: n // 100] = rng.normal(scale=3.0, size=(n // 100, dim))  # 1% off-distribution
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def speed(args) -> dict:
    import torch

    from batchseg.qc.duplicates import similar_pairs
    from batchseg.qc.model import fit_qc_model
    from batchseg.qc.reduction import Moments
    from batchseg.qc.settings import QcSettings

    torch.set_num_threads(1)
    rows_out, results = [], {}
    for n in (int(v) for v in args.sizes.split(",") if v):
        unit = _synthetic(n, args.dim)
        timings = {}
        with common.Timer() as t:
            moments = Moments(args.dim)
            for start in range(0, n, 4096):
                moments.add(unit[start:start + 4096])
        timings["moments"] = t.seconds
        sample = np.sort(np.random.default_rng(0).choice(n, size=min(20_000, n), replace=False))
        for method in ("rglasso", "mcd", "mogaal"):
            with common.Timer() as t:
                model = fit_qc_model(moments, unit[sample], QcSettings(method=method))
            timings[f"fit {method}"] = t.seconds
        model = fit_qc_model(moments, unit[sample], QcSettings(method="rglasso", compare=("mcd", "mogaal")))
        with common.Timer() as t:
            for start in range(0, n, 4096):
                model.score(unit[start:start + 4096])
        timings["score all rows, 3 methods"] = t.seconds
        for name, seconds in timings.items():
            rows_out.append((n, args.dim, name, f"{seconds:.2f}"))
        results[n] = timings
    for n in (int(v) for v in args.dup_sizes.split(",") if v):
        unit = _synthetic(n, args.dim, seed=1)
        with common.Timer() as t:
            i, _, _ = similar_pairs(unit, 0.97)
        rows_out.append((n, args.dim, f"all-pairs near-duplicates (exact, {len(i)} pairs)", f"{t.seconds:.2f}"))
        results[f"dup {n}"] = t.seconds
    print(f"\nspeed, synthetic unit embeddings, 1 thread (fit sample <= 20000 rows):")
    print(common.table(["rows", "dim", "step", "seconds"], rows_out))
    print(f"peak RSS of this process: {common.mib(common.peak_rss_bytes())} MiB")
    results["peak_rss_mib"] = common.peak_rss_bytes() / 2**20
    if args.bookkeeping:
        env = {**os.environ, **common.thread_env(1), "PYTHONPATH": str(common.ROOT)}
        child = subprocess.run([sys.executable, __file__, "--bookkeeping-only", str(args.bookkeeping)], env=env,
                               capture_output=True, text=True, check=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        results["bookkeeping"] = measured
        print(f"per-file bookkeeping (manifest plan + qc rows) for {measured['files']} files, in a fresh process: "
              f"{measured['peak_above_start_mib']:.0f} MiB above the process's memory after reading the manifest")
    return results


def bookkeeping(n: int) -> dict:
    """Memory of qc's per-file bookkeeping for ``n`` files (plan + new rows), in this process."""
    import pyarrow as pa

    from batchseg.io.qc_table import qc_schema
    from batchseg.io.tables import manifest_schema
    from batchseg.stages.qc import _new_rows
    from batchseg.stages.qc_plan import plan_qc

    rng = np.random.default_rng(0)
    ids = [f"{v:064x}" for v in rng.integers(0, 2**62, n)]
    columns = {"image_id": ids, "path": [f"d{i // 1000:05d}/img{i:08d}.jpg" for i in range(n)],
               "status": ["ok"] * n, "zarr_row": np.arange(n), "run_id": ["20260101T000000Z-aaaaaa"] * n,
               "clip_valid_h": np.full(n, 224, dtype=np.int32), "clip_valid_w": np.full(n, 168, dtype=np.int32)}
    schema = manifest_schema()
    manifest = pa.table({f.name: pa.array(columns.get(f.name, [None] * n), type=f.type) for f in schema},
                        schema=schema)
    del columns, ids
    base = common.current_rss_bytes()
    plan = plan_qc(manifest, qc_schema().empty_table(), None)
    position = {k: p for p, k in enumerate(plan.new_images)}
    scores = {name: rng.random(n) for name in ("rglasso", "mogaal", "mcd")}
    table = _new_rows(plan, position, scores, scores["rglasso"] > 0.95, {}, None, "20260101T000000Z-bbbbbb")
    assert table.num_rows == n
    return {"files": n, "peak_above_start_mib": (common.peak_rss_bytes() - base) / 2**20}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.bookkeeping_only:
        print(json.dumps(bookkeeping(args.bookkeeping_only)))
        return
    common.setup_logging()
    for line in common.machine_lines():
        print(line)
    work, made = common.workdir(args.workdir, "bench-qc-")
    try:
        results = {"quality": quality(args, work), "speed": speed(args)}
    finally:
        if made:
            shutil.rmtree(work, ignore_errors=True)
    print(common.load_line())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
