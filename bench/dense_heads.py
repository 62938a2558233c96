"""Label-time cost of each dense head against the embed pass, and stored bytes per image.

``embed`` stores the last ViT block's input tokens once; ``pseudolabel --dense-head``
computes a head from them per image. The issue's budget: any head costs at most 5% of
that image's embed pass (CLIP ViT-B/16 here; the SAM-assisted head also reads the SAM
embedding, whose encoder is not counted in the embed pass, so its ratio is pessimistic).

For each canvas (224 and 448 by default) it builds CLIP ViT-B/16 at random init (speed
does not depend on the weights; nothing is downloaded), times ``encode_tokens`` (what
embed runs per image) and each head on those tokens (with a ViT-B SAM-sized 256 x 64 x 64
embedding for proxy-sam), one image at a time, and prints seconds per image, the ratio
and the fp16 bytes per image stored before (one head's dense features + keys + global)
and after this layout (tokens + class token + global), uncompressed.

    .venv/bin/python bench/dense_heads.py                 # ViT-B/16 at 224 and 448, 4 images each
    .venv/bin/python bench/dense_heads.py --model tiny --images 2   # smoke
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as common

HEADS = ("maskclip", "value", "clearclip", "sclip", "naclip", "proxy-sam")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("ViT-B-16", "tiny"), default="ViT-B-16")
    parser.add_argument("--canvases", default="224,448", help="comma-separated CLIP canvases (default 224,448)")
    parser.add_argument("--images", type=int, default=4, help="timed images per canvas (default 4)")
    parser.add_argument("--threads", type=int, default=common.cores(), help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    args.canvases = [int(c) for c in args.canvases.split(",") if c]
    if args.images < 1 or not args.canvases:
        parser.error("need at least one image and one canvas")
    return args


def _clip(model: str, canvas: int):
    import open_clip

    from batchseg.models.clip import DenseClip, tiny_clip_config

    if model == "tiny":
        config = tiny_clip_config("vit")
        built = open_clip.CLIP(**config)
        return DenseClip(built, canvas if canvas % 8 == 0 else None)
    built = open_clip.create_model(model, pretrained=None)
    return DenseClip(built, canvas)


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    import torch

    from batchseg.models.dense_heads import DenseHeadSettings, compute_head

    torch.set_num_threads(args.threads)
    print("\n".join(common.machine_lines()))
    rows = []
    for canvas in args.canvases:
        clip = _clip(args.model, canvas)
        pixels = torch.randn(1, 3, clip.canvas, clip.canvas)
        sam_side = 64 if args.model != "tiny" else 16
        sam = torch.randn(1, 256 if args.model != "tiny" else 32, sam_side, sam_side)
        with torch.inference_mode():
            stored = clip.encode_tokens(pixels)
            embed_s = _seconds(lambda: clip.encode_tokens(pixels), args.images)
            g, width, dim = clip.grid, clip.token_dim, clip.dense_dim
            before = 2 * (dim * g * g + clip.key_dim * g * g + dim)
            after = 2 * (width * g * g + width + dim)
            rows.append([f"{clip.canvas} px, {g}x{g} grid", "embed pass (encode_tokens)", f"{embed_s:.4f}", "1.000",
                         f"{before:,} -> {after:,}"])
            for head in HEADS:
                settings = DenseHeadSettings(head)
                s = _seconds(lambda: compute_head(clip, settings, stored.tokens, stored.cls, sam), args.images)
                rows.append(["", head, f"{s:.4f}", f"{s / embed_s:.3f}", ""])
    print(f"\n{args.model}, CPU, {args.threads} threads, fp32, 1 image at a time, {args.images} timed runs:")
    print(common.table(["canvas", "step", "seconds / image", "ratio to embed pass",
                        "stored fp16 bytes/image (before -> after)"], rows))
    print(common.load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
