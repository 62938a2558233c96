"""Everything-mode proposals from a stored embedding against SAM's own SamAutomaticMaskGenerator.

All on the CPU with the ``tiny`` arch and random weights. A randomly initialised
decoder is useless for testing NMS as is: its transposed-convolution upscaling
has random 2x2 kernels, so every mask is a fine checkerboard texture spread over
the whole image, every box is the full image, and box NMS keeps exactly one mask.
The ``blocky`` fixture therefore makes three changes to the random model (none
touches code under test):

* the image embedding is piecewise constant (a Voronoi map of random vectors),
  fed to SAM's generator through a stub encoder that returns it;
* the upscaling kernels are made spatially constant, so masks are unions of
  embedding regions and boxes vary;
* the hypernetwork output is scaled up (logits far from 0, so stability scores
  spread over [0, 1]) and the IoU head is shifted by +0.5 (predicted IoUs around
  0.3-0.6, so a positive ``pred_iou_thresh`` filters something).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.utils.amg import build_point_grid
from torch import nn

from batchseg.labels.nms import mask_iou_matrix
from batchseg.labels.proposals import ProposalSettings, Proposals, generate_proposals, point_grid
from batchseg.models.sam import SAM_ARCHS, SamEncoder, build_sam_model

TINY = SAM_ARCHS["tiny"]
H, W = 90, 150  # non-square: letterboxed to 154 x 256 on the 256 canvas


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Run these tiny models on one intra-op thread.

    They gain nothing from threads, and on a busy 2-core CI box OpenMP's
    spin-waiting made this file 5x slower (50 s instead of 10 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _FixedEncoder(nn.Module):
    """Stands in for the image encoder: returns one given embedding for any input."""

    def __init__(self, embedding: torch.Tensor, img_size: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[None].expand(x.shape[0], -1, -1, -1)


@pytest.fixture(scope="module")
def blocky() -> tuple[Sam, torch.Tensor]:
    """``(sam, embedding)``: a tiny SAM whose encoder returns ``embedding`` (see module doc)."""
    torch.manual_seed(0)
    sam = build_sam_model(TINY)
    c, h, w = 32, 16, 16
    g = torch.Generator().manual_seed(1)
    seeds = torch.rand(64, 2, generator=g) * h
    vectors = torch.randn(64, c, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    embedding = vectors[dist.argmin(0)].permute(2, 0, 1).contiguous()
    sam.image_encoder = _FixedEncoder(embedding, TINY.image_size)
    with torch.no_grad():
        for m in sam.mask_decoder.output_upscaling:
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.copy_(m.weight.mean((2, 3), keepdim=True).expand_as(m.weight))
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(1000.0)
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.5)
    return sam, embedding


@pytest.fixture(scope="module")
def encoder_sam() -> Sam:
    """Plain random tiny SAM (random position tables too, as in test_sam)."""
    torch.manual_seed(0)
    sam = build_sam_model(TINY)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(std=0.02)
    return sam


def _amg(sam: Sam, image: np.ndarray, s: ProposalSettings) -> list[dict]:
    gen = SamAutomaticMaskGenerator(
        sam,
        points_per_side=s.points_per_side,
        points_per_batch=s.points_per_batch,
        pred_iou_thresh=s.pred_iou_thresh,
        stability_score_thresh=s.stability_score_thresh,
        stability_score_offset=s.stability_score_offset,
        box_nms_thresh=s.box_nms_thresh,
        crop_n_layers=0,
        output_mode="binary_mask",
    )
    return gen.generate(image)


def _assert_same_as_amg(ours: Proposals, ref: list[dict]) -> None:
    """Same count, every SAM mask among ours, and the same per-mask numbers in the same order."""
    assert len(ours) == len(ref)
    mine = {m.tobytes() for m in ours.masks}
    for r in ref:
        assert r["segmentation"].shape == (H, W)
        assert r["segmentation"].tobytes() in mine
    # NMS returns descending scores, so the order is the same too (no score ties here).
    if ref:
        np.testing.assert_array_equal(ours.masks, np.stack([r["segmentation"] for r in ref]))
    np.testing.assert_array_equal(ours.scores, np.array([r["predicted_iou"] for r in ref], np.float32))
    np.testing.assert_array_equal(ours.stability, np.array([r["stability_score"] for r in ref], np.float32))
    xywh = np.array([r["bbox"] for r in ref], np.float32).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    np.testing.assert_array_equal(ours.boxes_xyxy, xyxy)
    points = np.array([r["point_coords"][0] for r in ref], np.float32).reshape(-1, 2)
    np.testing.assert_array_equal(ours.points, points)


def _matched_iou(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """``(len(a), len(b))`` mask IoU where two empty masks (identical) count as 1."""
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    m = mask_iou_matrix(torch.cat([ta, tb]))[: len(ta), len(ta) :]
    empty_a, empty_b = ~ta.flatten(1).any(1), ~tb.flatten(1).any(1)
    m[empty_a[:, None] & empty_b[None, :]] = 1.0
    return m


def test_point_grid_is_sams() -> None:
    for n in (1, 5, 16):
        expected = build_point_grid(n) * np.array(((W, H),))
        np.testing.assert_array_equal(point_grid(n, H, W), expected)


# (points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh, box_nms_thresh).
# Batches that do not divide the point count exercise the last partial batch.
EXACT_CASES = [
    (16, 50, 0.3, 0.1, 0.7),  # both filters active (768 -> 726 candidates), 9 masks after NMS
    (16, 64, 0.0, 0.0, 0.7),  # filters off: empty masks and NaN stability survive, 19 masks
    (16, 100, 0.4, 0.2, 0.9),  # 508 candidates pass the filters, 4 masks
    (7, 13, 0.35, 0.05, 0.8),  # 122 candidates, 6 masks; 49 points in batches of 13
]


@pytest.mark.parametrize("pps,ppb,iou_t,stab_t,nms_t", EXACT_CASES)
def test_equals_sam_automatic_mask_generator(blocky, pps, ppb, iou_t, stab_t, nms_t) -> None:
    sam, embedding = blocky
    s = ProposalSettings(
        points_per_side=pps, points_per_batch=ppb, pred_iou_thresh=iou_t,
        stability_score_thresh=stab_t, box_nms_thresh=nms_t, nms="torchvision", mask_nms_thresh=None,
    )
    ref = _amg(sam, np.zeros((H, W, 3), np.uint8), s)
    ours = generate_proposals(sam, embedding, (H, W), s)
    assert len(ref) >= 3  # not vacuous: NMS and the filters leave several distinct masks
    _assert_same_as_amg(ours, ref)


def test_filters_and_nms_do_something(blocky) -> None:
    """Guard for the exactness test: its settings really filter and suppress."""
    sam, embedding = blocky
    s = ProposalSettings(points_per_side=16, points_per_batch=50, pred_iou_thresh=0.3,
                         stability_score_thresh=0.1, box_nms_thresh=0.7, nms="torchvision", mask_nms_thresh=None)
    no_filter = dataclasses.replace(s, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    no_nms = dataclasses.replace(s, box_nms_thresh=1.0)
    n_all = len(generate_proposals(sam, embedding, (H, W), no_filter))
    n_filtered = len(generate_proposals(sam, embedding, (H, W), no_nms))
    n_final = len(generate_proposals(sam, embedding, (H, W), s))
    assert n_all == 3 * 16 * 16
    assert n_all > n_filtered > n_final > 1


@pytest.mark.parametrize("nms_t", [1.0, 0.7])
def test_equals_sam_from_real_encoder_embedding(encoder_sam, nms_t) -> None:
    """The embedding SamEncoder stores gives SAM's masks (SAM running its own encoder)."""
    image = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    enc = SamEncoder(encoder_sam)
    with torch.inference_mode():
        embedding = enc(enc.preprocess(image)[None])[0]
    s = ProposalSettings(points_per_side=6, points_per_batch=10, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0, box_nms_thresh=nms_t, nms="torchvision", mask_nms_thresh=None)
    ref = _amg(encoder_sam, image, s)
    ours = generate_proposals(encoder_sam, embedding, (H, W), s)
    if nms_t == 1.0:
        assert len(ref) == 3 * 6 * 6  # nothing suppressed: every candidate compared
    _assert_same_as_amg(ours, ref)


def test_chunking_does_not_change_results(blocky) -> None:
    sam, embedding = blocky
    s = ProposalSettings(points_per_side=16, points_per_batch=50, pred_iou_thresh=0.3,
                         stability_score_thresh=0.1, nms="torchvision", mask_nms_thresh=None)
    big = generate_proposals(sam, embedding, (H, W), s)
    one_at_a_time = generate_proposals(sam, embedding, (H, W), s, max_chunk_elems=1)
    for f in dataclasses.fields(Proposals):
        np.testing.assert_array_equal(getattr(big, f.name), getattr(one_at_a_time, f.name))


def test_fast_nms_agreement_with_sam(blocky) -> None:
    """Fast NMS vs SAM's (classic) box NMS on the same candidates.

    Guaranteed: Fast NMS keeps a subset of what classic NMS keeps (a candidate
    classic NMS drops overlaps a higher-scored *kept* one, which Fast NMS counts
    too), so every Fast-NMS mask is exactly one of SAM's. Not guaranteed: recall,
    because Fast NMS also lets *suppressed* masks suppress. Measured mean
    best-match IoU of SAM's masks against ours on this fixture (deterministic,
    CPU): 0.780 with filters (9 vs 5 masks), 0.889 without (19 vs 14). The floor
    0.7 leaves room for last-bit differences across CPUs while catching a
    broken NMS (which drops far more, or keeps masks SAM does not).
    """
    sam, embedding = blocky
    for iou_t, stab_t, measured in ((0.3, 0.1, 0.780), (0.0, 0.0, 0.889)):
        s = ProposalSettings(points_per_side=16, points_per_batch=50, pred_iou_thresh=iou_t,
                             stability_score_thresh=stab_t, box_nms_thresh=0.7, nms="torchvision", mask_nms_thresh=None)
        classic = generate_proposals(sam, embedding, (H, W), s)
        fast = generate_proposals(sam, embedding, (H, W), dataclasses.replace(s, nms="fast"))
        assert 0 < len(fast) <= len(classic)
        kept = {m.tobytes() for m in classic.masks}
        assert all(m.tobytes() in kept for m in fast.masks)
        assert np.all(np.diff(fast.scores) <= 0)  # best first
        recall = _matched_iou(classic.masks, fast.masks).max(dim=1).values.mean().item()
        assert recall >= 0.7, f"mean best-match IoU {recall:.3f} (measured {measured} when written)"


def test_fp16_embedding_is_cast(blocky) -> None:
    """Stored embeddings are fp16: they run through the float32 decoder and agree closely."""
    sam, embedding = blocky
    s = ProposalSettings(points_per_side=16, points_per_batch=64, pred_iou_thresh=0.3,
                         stability_score_thresh=0.1, nms="torchvision", mask_nms_thresh=None)
    full = generate_proposals(sam, embedding, (H, W), s)
    half = generate_proposals(sam, embedding.half(), (H, W), s)
    assert half.scores.dtype == np.float32 and half.masks.dtype == np.bool_
    # Measured: 9 masks each way, mean best-match IoU 0.9995 both ways (a few pixels flip).
    m = _matched_iou(full.masks, half.masks)
    assert m.max(dim=1).values.mean().item() >= 0.95
    assert m.max(dim=0).values.mean().item() >= 0.95


def test_output_types_and_numpy_embedding(blocky) -> None:
    sam, embedding = blocky
    s = ProposalSettings(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.3,
                         stability_score_thresh=0.1)
    p = generate_proposals(sam, embedding.numpy().astype(np.float16), (H, W), s)
    n = len(p)
    assert n > 0
    assert p.masks.shape == (n, H, W) and p.masks.dtype == np.bool_
    for arr, shape in ((p.scores, (n,)), (p.stability, (n,)), (p.boxes_xyxy, (n, 4)), (p.points, (n, 2))):
        assert arr.shape == shape and arr.dtype == np.float32
    # Points are grid points in original pixels; boxes contain their masks.
    assert np.all((p.points >= 0) & (p.points <= [W, H]))
    for mask, (x1, y1, x2, y2) in zip(p.masks, p.boxes_xyxy.astype(int)):
        ys, xs = np.nonzero(mask)
        if len(ys):
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x1, y1, x2, y2)


def test_nothing_passes_gives_empty_proposals(blocky) -> None:
    sam, embedding = blocky
    p = generate_proposals(sam, embedding, (H, W), ProposalSettings(points_per_side=4, pred_iou_thresh=50.0))
    assert len(p) == 0
    assert p.masks.shape == (0, H, W) and p.boxes_xyxy.shape == (0, 4) and p.points.shape == (0, 2)


def test_rejects_bad_inputs(blocky) -> None:
    sam, embedding = blocky
    with pytest.raises(ValueError, match="min_mask_region_area"):
        ProposalSettings(min_mask_region_area=100)
    with pytest.raises(ValueError, match="nms"):
        ProposalSettings(nms="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="points_per_side"):
        ProposalSettings(points_per_side=0)
    with pytest.raises(ValueError, match="shape"):
        generate_proposals(sam, embedding[:, :8], (H, W))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_sam_on_cuda(blocky) -> None:
    """On the GPU both run the same batches through the same kernels: still SAM's result."""
    sam, embedding = blocky
    sam = sam.to("cuda")
    sam.image_encoder.embedding = embedding.to("cuda")
    try:
        s = ProposalSettings(points_per_side=16, points_per_batch=50, pred_iou_thresh=0.3,
                             stability_score_thresh=0.1, nms="torchvision", mask_nms_thresh=None)
        ref = _amg(sam, np.zeros((H, W, 3), np.uint8), s)
        ours = generate_proposals(sam, embedding.half(), (H, W), s)  # moved + cast to the model
        assert len(ours) > 0
        ours_same = generate_proposals(sam, embedding, (H, W), s)
        _assert_same_as_amg(ours_same, ref)
    finally:
        sam.to("cpu")
        sam.image_encoder.embedding = embedding


def _duplicate_pairs(masks: np.ndarray, above: float) -> int:
    if len(masks) < 2:
        return 0
    iou = mask_iou_matrix(torch.from_numpy(masks))
    return int(torch.triu(iou > above, diagonal=1).sum())


def test_mask_nms_removes_duplicates_that_box_nms_misses() -> None:
    """The shipped toy SAM's masks carry stray pixels, so twins' boxes disagree and box NMS
    keeps both; the mask pass keeps one of each. Without it (SAM's behaviour) they stay."""
    from batchseg.assets import TOY_SAM_CHECKPOINT
    from batchseg.models.sam import SamSpec, load_sam
    from batchseg.world import render_sample

    sam = load_sam(SamSpec("tiny", str(TOY_SAM_CHECKPOINT)))
    enc = SamEncoder(sam)
    counts = {"box only": 0, "box + mask": 0}
    kept = {"box only": 0, "box + mask": 0}
    for index in range(6):
        image = render_sample(5000, index).image
        with torch.inference_mode():
            embedding = enc(enc.preprocess(image)[None])[0]
        for name, thresh in (("box only", None), ("box + mask", 0.7)):
            p = generate_proposals(sam, embedding, image.shape[:2],
                                   ProposalSettings(points_per_side=16, mask_nms_thresh=thresh))
            counts[name] += _duplicate_pairs(p.masks, 0.8)
            kept[name] += len(p)
    assert counts["box only"] > 0
    assert counts["box + mask"] == 0
    assert 0 < kept["box + mask"] < kept["box only"]
    with pytest.raises(ValueError, match="mask_nms_thresh"):
        ProposalSettings(mask_nms_thresh=-0.5)


def _off_by_one_case(canvas: int, max_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """An original size whose work frame letterboxes one pixel differently from the original."""
    from batchseg.io.geometry import letterbox
    from batchseg.labels.image_labels import ImageFrame

    for height in range(max_side + 1, 4 * max_side):
        for width in range(max_side + 1, height):
            frame = ImageFrame.create("x", height, width, max_side)
            stored, recomputed = letterbox(height, width, canvas), letterbox(frame.work_h, frame.work_w, canvas)
            if (stored.valid_h, stored.valid_w) != (recomputed.valid_h, recomputed.valid_w):
                return (frame.work_h, frame.work_w), (stored.valid_h, stored.valid_w)
    raise AssertionError("no size found")


def test_masks_of_a_work_frame_use_the_stored_valid_region(blocky) -> None:
    """SAM's own decoder and postprocess_masks with the stored region are the reference."""
    sam, embedding = blocky
    work, stored = _off_by_one_case(TINY.image_size, max_side=40)
    s = ProposalSettings(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                         nms="torchvision", mask_nms_thresh=None)
    grid = point_grid(3, *work)
    coords = grid * np.array([[stored[1] / work[1], stored[0] / work[0]]])
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(torch.as_tensor(coords)[:, None, :], torch.ones((9, 1), dtype=torch.int)),
                                           boxes=None, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=embedding[None], image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
        expected = sam.postprocess_masks(low.flatten(0, 1)[:, None], stored, work)[:, 0] > sam.mask_threshold
    expected = {m.tobytes() for m in expected.numpy()}
    with torch.no_grad():
        read = generate_proposals(sam, embedding, work, s, input_size=stored)
        recomputed = generate_proposals(sam, embedding, work, s)
    assert read.masks.shape[1:] == work and len(read) == 27
    assert {m.tobytes() for m in read.masks} == expected
    assert {m.tobytes() for m in recomputed.masks} != expected  # the off-by-one is visible


def test_an_input_size_off_the_canvas_is_refused(blocky) -> None:
    sam, embedding = blocky
    with pytest.raises(ValueError, match="not a valid region"):
        generate_proposals(sam, embedding, (H, W), input_size=(0, TINY.image_size + 1))
