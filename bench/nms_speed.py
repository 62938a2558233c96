"""Fast NMS (ours, YOLACT) against torchvision's classic NMS on clustered random boxes.

For each box count (default 100, 1000, 5000) one seeded set of boxes is drawn the way
detector / SAM candidates look: boxes come in clusters (about 10 per cluster, jittered
centre and size around a cluster box), so many boxes overlap strongly, as SAM's 3 masks
per point and neighbouring grid points do. Scores are uniform in [0, 1].

Timed, each as a whole call on the same float32 tensors (sort included):

* **torchvision** (the baseline): ``torchvision.ops.batched_nms(boxes, scores,
  zeros, thresh)``, single category, exactly SAM's and ``generate_proposals``'
  ``nms="torchvision"`` call; ``torchvision.ops.nms`` is also timed for reference.
* **fast**: ``batchseg.labels.nms.fast_nms_boxes(boxes, scores, thresh)``, which
  ``generate_proposals`` uses with ``nms="fast"``.

Each is run ``--warmup`` times untimed, then ``--repeats`` times with
``time.perf_counter``; the median is reported. Ratio = ours / torchvision (below 1:
Fast NMS is faster).

Agreement: Jaccard index of the kept index sets (|A & B| / |A | B|). By design Fast
NMS does **not** reproduce classic NMS: it lets already-suppressed boxes suppress
too, so it keeps a *subset* of what classic NMS keeps (it may suppress more, never
less). The script checks the subset property and prints how many boxes each keeps.

    .venv/bin/python bench/nms_speed.py                        # 100, 1000, 5000 boxes, IoU 0.7
    .venv/bin/python bench/nms_speed.py --sizes 100 --repeats 3  # smoke test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000],
                        help="box counts (default 100 1000 5000)")
    parser.add_argument("--iou-thresh", type=float, default=0.7, help="NMS IoU threshold (default 0.7, SAM's)")
    parser.add_argument("--cluster-size", type=float, default=10.0,
                        help="mean boxes per cluster (default 10); larger: more overlap")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per method and size (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--threads", type=int, default=common.cores(), help="torch intra-op threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    parser.add_argument("--seed", type=int, default=0, help="box seed (default 0)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--sizes and --repeats must be >= 1, --warmup >= 0, --threads >= 1")
    if not 0.0 <= args.iou_thresh <= 1.0:
        parser.error("--iou-thresh must be in [0, 1]")
    return args


def clustered_boxes(n: int, seed: int, cluster_size: float, canvas: float = 1024.0):
    """``(n, 4)`` float32 xyxy boxes in clusters, and ``(n,)`` uniform scores (seeded)."""
    import numpy as np
    import torch

    rng = np.random.default_rng([seed, n])
    clusters = max(1, round(n / cluster_size))
    # Cluster boxes: log-uniform side lengths from 2% to 60% of the canvas.
    side = np.exp(rng.uniform(np.log(0.02 * canvas), np.log(0.6 * canvas), (clusters, 2)))
    centre = rng.uniform(0, canvas, (clusters, 2))
    which = rng.integers(0, clusters, n)
    # Members: centre jitter of 10% of the side, side scaled by about +-15%.
    wh = side[which] * np.exp(rng.normal(0.0, 0.15, (n, 2)))
    c = centre[which] + rng.normal(0.0, 0.1, (n, 2)) * side[which]
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).clip(0, canvas)
    scores = rng.uniform(0.0, 1.0, n)
    return torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32)


def median_seconds(fn, repeats: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from torchvision.ops import batched_nms, nms

    from batchseg.labels.nms import box_iou_matrix, fast_nms_boxes

    torch.set_num_threads(args.threads)
    rss_after_imports = common.current_rss_bytes()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print("\n".join(common.machine_lines()))
    print(f"device {device}, torch threads {torch.get_num_threads()}, IoU threshold {args.iou_thresh}, "
          f"~{args.cluster_size:g} boxes per cluster, median of {args.repeats} runs after {args.warmup} warm-up runs",
          flush=True)

    rows, overlap_rows = [], []
    all_subset = True
    for n in args.sizes:
        boxes, scores = clustered_boxes(n, args.seed, args.cluster_size)
        boxes, scores = boxes.to(device), scores.to(device)
        cats = torch.zeros(n, dtype=torch.int64, device=device)
        t_tv = median_seconds(lambda: batched_nms(boxes, scores, cats, args.iou_thresh), args.repeats, args.warmup, sync)
        t_nms = median_seconds(lambda: nms(boxes, scores, args.iou_thresh), args.repeats, args.warmup, sync)
        t_fast = median_seconds(lambda: fast_nms_boxes(boxes, scores, args.iou_thresh), args.repeats, args.warmup, sync)

        classic = set(batched_nms(boxes, scores, cats, args.iou_thresh).tolist())
        fast = set(fast_nms_boxes(boxes, scores, args.iou_thresh).tolist())
        union = classic | fast
        jaccard = len(classic & fast) / len(union) if union else 1.0
        subset = fast <= classic
        all_subset &= subset
        rows.append((
            n, f"{t_tv * 1e3:.3f}", f"{t_nms * 1e3:.3f}", f"{t_fast * 1e3:.3f}", common.ratio(t_fast, t_tv),
            len(classic), len(fast), f"{jaccard:.3f}", "yes" if subset else "NO",
        ))
        # How crowded the set is: share of box pairs above the threshold (n <= 5000: one matrix).
        if n <= 5000:
            iou = box_iou_matrix(boxes.cpu())
            pairs = n * (n - 1)
            crowded = ((iou > args.iou_thresh).sum().item() - n) / pairs if pairs else 0.0
            has_neighbour = ((iou > args.iou_thresh).sum(dim=1) > 1).float().mean().item()
            overlap_rows.append((n, f"{100 * crowded:.2f} %", f"{100 * has_neighbour:.1f} %"))
            del iou

    print()
    print(common.table(
        ("boxes", "torchvision batched_nms ms (baseline)", "torchvision nms ms", "fast_nms_boxes ms",
         "ratio fast/torchvision", "kept classic", "kept fast", "Jaccard kept sets", "fast subset of classic"),
        rows,
    ))
    print()
    print(common.table(("boxes", f"pairs with IoU > {args.iou_thresh}", "boxes with such a neighbour"), overlap_rows))
    print()
    print("Fast NMS is not classic NMS by design: it lets boxes that were themselves suppressed suppress others, "
          "so it keeps a subset of classic NMS's boxes (it may suppress more, never less); a Jaccard below 1 "
          "is that difference, not an error." + ("" if all_subset else
                                                   " WARNING: the subset property failed above, which is a bug."))
    print("Fast NMS builds the full n x n IoU matrix (a few n x n float32 buffers in box_iou_matrix, "
          f"about {12 * max(args.sizes) ** 2 / 2**20:.0f} MiB at n = {max(args.sizes)}); "
          "classic NMS is a sequential loop with early exits in C++/CUDA. "
          f"Peak RSS of this process: {common.mib(common.peak_rss_bytes())} MiB "
          f"({common.mib(rss_after_imports)} MiB after imports).")
    print(common.load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
