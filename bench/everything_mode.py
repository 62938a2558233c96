"""SAM everything mode from stored embeddings (ours) against SamAutomaticMaskGenerator (SAM's own).

Same model, same images, same point grid and thresholds on both sides:

* **AMG** (the baseline): ``segment_anything.SamAutomaticMaskGenerator(sam, ...)
  .generate(image)`` with ``crop_n_layers=0`` and ``output_mode="binary_mask"``: it
  runs SAM's image encoder on the image, then the prompt encoder and mask decoder
  on the point grid. Its encoder time is measured inside that call (the encoder is
  wrapped in a timer), so the table also shows "AMG minus encoder": what the
  everything-mode decoding alone costs SAM's generator.
* **ours**: ``batchseg.labels.proposals.generate_proposals(sam, embedding, ...)`` on
  the image embedding that ``batchseg embed`` would have stored: computed beforehand
  with ``SamEncoder`` (SAM's preprocessing, bit-equal to ``SamPredictor.set_image``)
  and cast to ``--store-dtype`` (fp16, as the Zarr store holds it). The encoder is
  not timed for ours: in the pipeline it ran once, in ``embed``. Timed for
  ``nms="torchvision", mask_nms_thresh=None`` (SAM's NMS, results should equal AMG's) and ``nms="fast"``.

Speed ratio = AMG seconds/image / ours seconds/image (target >= 3). Mask agreement =
mean over AMG's masks of the best IoU with any of our masks (target >= 0.95; about
1.0 for torchvision NMS, fp16 storage flips a few pixels); the reverse direction
(ours against AMG) is printed too.

Models are random-init (``--sam vit_b`` or ``tiny``; no downloads). A random SAM is
degenerate for this comparison: its decoder's transposed convolutions have random
2x2 kernels, so every mask is a fine checkerboard over the whole image, every box is
the whole image and box NMS keeps one mask (see tests/test_proposals.py). The
default ``--decoder blocky`` therefore applies the same fixture as those tests, to
the one model both sides use: the encoder output is made piecewise constant (a
Voronoi map over ``--regions`` seed cells of the real encoder output; the encoder still runs in
full, so its cost is unchanged), the upscaling kernels are made spatially constant,
the hypernetwork output is scaled up (stability scores spread over [0, 1]) and the
IoU head is shifted by +0.5 (predicted IoUs around 0.3-0.6). Masks are then unions
of image regions with varied boxes, so the filters and NMS have real work.
``--decoder random`` keeps the plain random model. Default thresholds are 0 (filters
off; the random model's scores mean nothing): every candidate is upscaled and
compared, SAM's worst case, on both sides. The counts of masks kept are printed.

    .venv/bin/python bench/everything_mode.py                              # vit_b, 640x480, 2 images, 32x32 points
    .venv/bin/python bench/everything_mode.py --sam tiny --images 2 --points-per-side 8 --image-size 160x120  # smoke
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import _common as common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam", choices=("vit_b", "tiny"), default="vit_b", help="SAM arch, random init (default vit_b)")
    parser.add_argument("--decoder", choices=("blocky", "random"), default="blocky",
                        help="blocky: the tests' fixture so masks vary (default); random: plain random SAM")
    parser.add_argument("--regions", type=int, default=None,
                        help="blocky: Voronoi regions of the embedding (default 8 for vit_b, 64 for tiny: "
                             "fewer, larger regions give masks with varied boxes)")
    parser.add_argument("--images", type=int, default=2, help="images (default 2)")
    parser.add_argument("--image-size", type=common.parse_image_size, default=None,
                        help="WIDTHxHEIGHT of the generated photo-like images (default 640x480 for vit_b, "
                             "160x120 for tiny), or 'small'")
    parser.add_argument("--points-per-side", type=int, default=32, help="point grid side (default 32, SAM's)")
    parser.add_argument("--points-per-batch", type=int, default=64, help="points per decoder batch (default 64, SAM's)")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0,
                        help="keep masks with predicted IoU above this; <= 0 disables (default 0; SAM's is 0.88)")
    parser.add_argument("--stability-thresh", type=float, default=0.0,
                        help="keep masks at least this stable; <= 0 disables (default 0; SAM's is 0.95)")
    parser.add_argument("--nms-thresh", type=float, default=0.7, help="box NMS IoU threshold (default 0.7)")
    parser.add_argument("--store-dtype", choices=("fp16", "fp32"), default="fp16",
                        help="dtype of the stored embedding ours decodes (default fp16, as the store)")
    parser.add_argument("--threads", type=int, default=common.cores(), help="torch threads (default: all cores)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up pass (1 image, 2x2 points)")
    parser.add_argument("--seed", type=int, default=0, help="model and image seed (default 0)")
    parser.add_argument("--workdir", default=None, help="keep the images here (default: a temp folder, deleted)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.points_per_side < 1 or args.points_per_batch < 1 or args.threads < 1:
        parser.error("--images, --points-per-side, --points-per-batch and --threads must be at least 1")
    if args.image_size is None:
        args.image_size = (640, 480) if args.sam == "vit_b" else (160, 120)
    if args.regions is None:
        args.regions = 8 if args.sam == "vit_b" else 64
    if args.regions < 1:
        parser.error("--regions must be at least 1")
    return args


def build_model(arch_name: str, decoder: str, seed: int, regions: int = 64):
    """``(sam, timed_encoder, sam_encoder)``: a random SAM whose ``image_encoder`` is a timing wrapper,
    and a ``SamEncoder`` for its preprocessing and geometry."""
    import torch
    from torch import nn

    from batchseg.models.sam import SAM_ARCHS, SamEncoder, build_sam_model

    class BenchEncoder(nn.Module):
        """SAM's image encoder plus an optional Voronoi step; accumulates its own wall time."""

        def __init__(self, inner: nn.Module, blocky: bool, seed: int, regions: int) -> None:
            super().__init__()
            self.inner = inner
            self.img_size = inner.img_size
            self.blocky = blocky
            self.seconds = 0.0
            self.calls = 0
            self._seed = seed
            self.regions = regions

        def _voronoi(self, out: torch.Tensor) -> torch.Tensor:
            b, c, h, w = out.shape
            g = torch.Generator().manual_seed(self._seed + 1)
            k = min(self.regions, h * w)
            seeds = torch.rand(k, 2, generator=g) * torch.tensor([h, w])
            yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
            owner = dist.argmin(0).to(out.device)  # (h, w): which seed each cell belongs to
            sy = seeds[:, 0].long().clamp_max(h - 1).to(out.device)
            sx = seeds[:, 1].long().clamp_max(w - 1).to(out.device)
            vectors = out[:, :, sy, sx]  # (b, c, k): the encoder's output at the seed cells
            return vectors[:, :, owner].contiguous()  # (b, c, h, w), piecewise constant

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = self.inner(x)
            if self.blocky:
                out = self._voronoi(out)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam_model(SAM_ARCHS[arch_name])
        # build_sam_model leaves the relative position tables at zero (as SAM's init):
        # give them random values like a trained model has, so the encoder does real work.
        with torch.no_grad():
            for name, p in sam.named_parameters():
                if "rel_pos" in name:
                    p.normal_(std=0.02)
    if decoder == "blocky":
        with torch.no_grad():
            for m in sam.mask_decoder.output_upscaling:
                if isinstance(m, nn.ConvTranspose2d):
                    m.weight.copy_(m.weight.mean((2, 3), keepdim=True).expand_as(m.weight))
            for mlp in sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(1000.0)
            sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.5)
    # SamEncoder (preprocessing, geometry) is built on the real encoder; the stored
    # embedding then goes through the wrapper, so it is exactly what AMG's encoder returns.
    preprocessor = SamEncoder(sam)
    wrapper = BenchEncoder(sam.image_encoder, decoder == "blocky", seed, regions)
    sam.image_encoder = wrapper
    return sam.eval(), wrapper, preprocessor


def best_match(a, b) -> float | None:
    """Mean over ``a``'s masks of the best IoU with any of ``b``'s; two empty masks count as equal."""
    import numpy as np
    import torch

    from batchseg.labels.nms import mask_iou_matrix

    if len(a) == 0:
        return None
    if len(b) == 0:
        return 0.0
    ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
    m = mask_iou_matrix(torch.cat([ta, tb]))[: len(ta), len(ta):]
    empty_a, empty_b = ~ta.flatten(1).any(1), ~tb.flatten(1).any(1)
    m[empty_a[:, None] & empty_b[None, :]] = 1.0
    return m.max(dim=1).values.mean().item()


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import dataclasses
    import shutil

    import numpy as np
    import torch
    from PIL import Image
    from segment_anything import SamAutomaticMaskGenerator

    from batchseg.labels.proposals import ProposalSettings, generate_proposals

    torch.set_num_threads(args.threads)
    folder, created = common.workdir(args.workdir, "bench-everything-")
    try:
        paths = common.write_images(folder / "images", args.images, args.image_size, seed=args.seed)
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        sam, encoder, probe = build_model(args.sam, args.decoder, args.seed, args.regions)
        settings = ProposalSettings(
            points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
            box_nms_thresh=args.nms_thresh, nms="torchvision", mask_nms_thresh=None,
        )
        variants = {"torchvision": settings, "fast": dataclasses.replace(settings, nms="fast")}
        store_dtype = torch.float16 if args.store_dtype == "fp16" else torch.float32
        params = sum(p.numel() for p in sam.parameters())
        size = "small (40-120 px)" if args.image_size is None else f"{args.image_size[0]}x{args.image_size[1]}"
        print("\n".join(common.machine_lines()))
        blocky = f", {args.regions} regions" if args.decoder == "blocky" else ""
        print(f"SAM {args.sam} (random init, decoder {args.decoder}{blocky}), {params / 1e6:.1f} M params, canvas "
              f"{encoder.img_size}, embedding {probe.embed_shape}; {len(images)} images {size}; "
              f"{args.points_per_side}x{args.points_per_side} points in batches of {args.points_per_batch}, "
              f"pred_iou_thresh {args.pred_iou_thresh}, stability_thresh {args.stability_thresh}, "
              f"box NMS {args.nms_thresh}; stored embedding {args.store_dtype}; torch threads {torch.get_num_threads()}",
              flush=True)

        def amg(image, s: ProposalSettings):
            gen = SamAutomaticMaskGenerator(
                sam, points_per_side=s.points_per_side, points_per_batch=s.points_per_batch,
                pred_iou_thresh=s.pred_iou_thresh, stability_score_thresh=s.stability_score_thresh,
                stability_score_offset=s.stability_score_offset, box_nms_thresh=s.box_nms_thresh,
                crop_n_layers=0, output_mode="binary_mask",
            )
            return gen.generate(image)

        def stored_embedding(image) -> torch.Tensor:
            with torch.inference_mode():
                return encoder(probe.preprocess(image)[None])[0].to(store_dtype).clone()

        if not args.no_warmup:
            print("warm-up (untimed) ...", flush=True)
            tiny = dataclasses.replace(settings, points_per_side=2)
            amg(images[0], tiny)
            emb = stored_embedding(images[0])
            for s in variants.values():
                generate_proposals(sam, emb, images[0].shape[:2], dataclasses.replace(s, points_per_side=2))

        totals = {"amg": 0.0, "amg_encoder": 0.0, "torchvision": 0.0, "fast": 0.0, "store_encoder": 0.0}
        per_image = []
        for index, image in enumerate(images):
            height, width = image.shape[:2]
            # What embed stores (not part of ours' time: embed ran it once, earlier).
            start = time.perf_counter()
            emb = stored_embedding(image)
            totals["store_encoder"] += time.perf_counter() - start

            gc.collect()
            before = encoder.seconds
            start = time.perf_counter()
            ref = amg(image, settings)
            t_amg = time.perf_counter() - start
            t_enc = encoder.seconds - before
            totals["amg"] += t_amg
            totals["amg_encoder"] += t_enc
            ref_masks = np.stack([r["segmentation"] for r in ref]) if ref else np.zeros((0, height, width), bool)

            row = {"image": index, "amg_s": t_amg, "amg_enc_s": t_enc, "amg_masks": len(ref)}
            calls_before = encoder.calls
            for name, s in variants.items():
                gc.collect()
                start = time.perf_counter()
                ours = generate_proposals(sam, emb, (height, width), s)
                t = time.perf_counter() - start
                totals[name] += t
                row[f"{name}_s"] = t
                row[f"{name}_masks"] = len(ours)
                row[f"{name}_amg_vs_ours"] = best_match(ref_masks, ours.masks)
                row[f"{name}_ours_vs_amg"] = best_match(ours.masks, ref_masks)
                if name == "torchvision":
                    row["exact"] = (len(ours) == len(ref) and bool(np.array_equal(ours.masks, ref_masks)))
            assert encoder.calls == calls_before, "generate_proposals must not call the image encoder"
            per_image.append(row)
            print(f"image {index}: AMG {t_amg:.2f} s (encoder {t_enc:.2f} s), ours torchvision "
                  f"{row['torchvision_s']:.2f} s, fast {row['fast_s']:.2f} s; masks AMG {len(ref)}, "
                  f"torchvision {row['torchvision_masks']}, fast {row['fast_masks']}", flush=True)

        n = len(images)
        amg_s = totals["amg"] / n
        amg_dec_s = (totals["amg"] - totals["amg_encoder"]) / n
        speed_rows = [
            ("AMG (encoder + decoder), the baseline", f"{amg_s:.3f}", "1.00", "1.00"),
            ("AMG minus its encoder (decoding only)", f"{amg_dec_s:.3f}", f"{amg_s / amg_dec_s:.2f}" if amg_dec_s > 0 else "n/a", "-"),
            ("  of which: AMG's encoder", f"{totals['amg_encoder'] / n:.3f}", "-", "-"),
        ]
        for name in variants:
            ours_s = totals[name] / n
            speed_rows.append((
                f"ours, stored embedding, nms={name}", f"{ours_s:.3f}",
                f"{amg_s / ours_s:.2f}" if ours_s > 0 else "n/a",
                f"{amg_dec_s / ours_s:.2f}" if ours_s > 0 else "n/a",
            ))
        print()
        print(common.table(("method", "seconds/image", "speed-up AMG/this (target >= 3)",
                            "speed-up AMG-minus-encoder/this"), speed_rows))

        agree_rows = []
        for name in variants:
            a2o = [r[f"{name}_amg_vs_ours"] for r in per_image if r[f"{name}_amg_vs_ours"] is not None]
            o2a = [r[f"{name}_ours_vs_amg"] for r in per_image if r[f"{name}_ours_vs_amg"] is not None]
            agree_rows.append((
                f"nms={name}", sum(r["amg_masks"] for r in per_image), sum(r[f"{name}_masks"] for r in per_image),
                fmt(float(np.mean(a2o)) if a2o else None), fmt(float(np.mean(o2a)) if o2a else None),
                f"{sum(r['exact'] for r in per_image)}/{n}" if name == "torchvision" else "-",
            ))
        print()
        print(common.table(("ours", "masks AMG (all images)", "masks ours", "mean best-match IoU AMG->ours (target >= 0.95)",
                            "mean best-match IoU ours->AMG", "images bit-identical to AMG"), agree_rows))
        print()
        print(common.table(
            ("image", "AMG s", "AMG encoder s", "ours tv s", "ours fast s", "masks AMG / tv / fast", "IoU AMG->tv", "IoU AMG->fast"),
            [(r["image"], f"{r['amg_s']:.2f}", f"{r['amg_enc_s']:.2f}", f"{r['torchvision_s']:.2f}", f"{r['fast_s']:.2f}",
              f"{r['amg_masks']} / {r['torchvision_masks']} / {r['fast_masks']}",
              fmt(r["torchvision_amg_vs_ours"]), fmt(r["fast_amg_vs_ours"])) for r in per_image],
        ))
        print()
        print(f"embedding for the store (SamEncoder, untimed for ours): {totals['store_encoder'] / n:.3f} s/image. "
              "Best-match IoU is averaged over images that have masks; 'n/a' means no masks on that side.")
        print("Fast NMS keeps a subset of classic NMS's masks by design (suppressed masks suppress too), so its "
              "AMG->ours agreement can be below 1 while every mask it keeps is one of AMG's (ours->AMG about 1).")
        if args.decoder == "random":
            print("decoder 'random': every mask is a whole-image texture and NMS keeps about one mask; agreement "
                  "is then nearly vacuous. Use --decoder blocky for a meaningful comparison.")
        print(common.load_line())
        return 0
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
