"""Tests for batchseg.models.sam: archs, safe loading, and SamPredictor-exact encoding.

Everything runs on the CPU with the ``tiny`` arch; the official archs are only
ever built on the ``meta`` device (shapes without memory), so nothing here needs
a download or a large model.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch.testing import assert_close

from batchseg.errors import ModelLoadError, UsageError
from batchseg.io.geometry import letterbox
from batchseg.models.sam import (
    SAM_ARCHS,
    SamArch,
    SamEncoder,
    SamSpec,
    _ENCODER_FIELDS,
    _infer_arch,
    build_sam_model,
    embed_shape_for,
    load_sam,
    save_sam_checkpoint,
)

TINY = SAM_ARCHS["tiny"]


@pytest.fixture(scope="module")
def tiny_sam() -> Sam:
    """A randomly initialised tiny SAM with non-trivial weights everywhere.

    segment-anything zero-initialises the relative position tables and the
    position embedding; random values there make the equality tests meaningful.
    """
    torch.manual_seed(0)
    sam = build_sam_model(TINY)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(std=0.02)
    return sam


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random ``(h, w, 3)`` uint8 RGB image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _predictor_input(sam: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """What ``SamPredictor.set_image`` feeds the encoder: ``(1, 3, S, S)`` and the input size."""
    predictor = SamPredictor(sam)
    resized = predictor.transform.apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    return sam.preprocess(x), tuple(x.shape[-2:])


def _meta_state_shapes(build) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        sam = build()
    return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


# --------------------------------------------------------------------------- archs


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_archs_have_segment_anythings_parameters(name: str) -> None:
    """Our builder gives exactly the official names and shapes (so official checkpoints load)."""
    ours = _meta_state_shapes(lambda: build_sam_model(SAM_ARCHS[name]))
    official = _meta_state_shapes(sam_model_registry[name])
    assert ours == official


@pytest.mark.parametrize(
    ("name", "shape"),
    [("vit_b", (256, 64, 64)), ("vit_l", (256, 64, 64)), ("vit_h", (256, 64, 64)), ("tiny", (32, 16, 16))],
)
def test_embed_shape_for_without_building(name: str, shape: tuple[int, int, int]) -> None:
    assert embed_shape_for(SAM_ARCHS[name]) == shape


@pytest.mark.parametrize("name", sorted(SAM_ARCHS))
def test_encoder_reads_embed_shape_from_the_model(name: str) -> None:
    """SamEncoder.embed_shape comes from the layers; check it on meta-built models (no memory)."""
    with torch.device("meta"):
        sam = build_sam_model(SAM_ARCHS[name])
    encoder = SamEncoder(sam)
    assert encoder.embed_shape == embed_shape_for(SAM_ARCHS[name])
    assert encoder.image_size == SAM_ARCHS[name].image_size


def test_tiny_embed_shape_matches_actual_output(tiny_sam: Sam) -> None:
    encoder = SamEncoder(tiny_sam)
    with torch.no_grad():
        out = encoder(torch.zeros(2, 3, encoder.image_size, encoder.image_size))
    assert tuple(out.shape) == (2, *encoder.embed_shape) == (2, *embed_shape_for(TINY))


@pytest.mark.parametrize("name", sorted(SAM_ARCHS))
def test_infer_arch_recovers_encoder_sizes(name: str) -> None:
    """The checkpoint sniffing behind 'looks like weights for ...' recovers every arch."""
    with torch.device("meta"):
        state = build_sam_model(SAM_ARCHS[name]).state_dict()
    found = _infer_arch(state)
    assert found is not None
    for field in _ENCODER_FIELDS:
        assert getattr(found, field) == getattr(SAM_ARCHS[name], field), field


def test_tiny_decoder_works(tiny_sam: Sam) -> None:
    """The tiny prompt encoder + mask decoder run end to end through SamPredictor."""
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(_image(50, 80))
    masks, scores, low_res = predictor.predict(
        point_coords=np.array([[10, 20]]), point_labels=np.array([1]), box=np.array([5, 5, 60, 40])
    )
    assert masks.shape == (3, 50, 80)
    assert scores.shape == (3,)
    side = 4 * embed_shape_for(TINY)[1]  # the decoder upscales the embedding grid 4x
    assert low_res.shape == (3, side, side)


@pytest.mark.parametrize(
    "bad",
    [
        {"encoder_num_heads": 3},  # 32 not divisible by 3
        {"image_size": 250},  # not a multiple of the patch
        {"encoder_global_attn_indexes": (5,)},  # beyond depth
        {"prompt_embed_dim": 36},  # not divisible by 8
    ],
)
def test_build_rejects_inconsistent_arch(bad: dict) -> None:
    with pytest.raises(ValueError, match="invalid SamArch"):
        build_sam_model(dataclasses.replace(TINY, **bad))


# --------------------------------------------------------------------------- geometry


LETTERBOX_CASES = [
    (50, 80, 256),
    (80, 50, 256),
    (256, 256, 256),
    (1, 1, 256),
    (7, 3, 256),
    (333, 777, 1024),
    (777, 333, 1024),
    (1080, 1920, 1024),
    (1920, 1080, 1024),
    (3000, 4000, 1024),
    (4000, 3001, 1024),
    (513, 1025, 1024),
    (1023, 1, 1024),
    (1, 2047, 1024),  # 1024/2047 = 0.5002 -> rounds up to one row
    (101, 99, 128),
    (999, 1, 128),  # degenerate: SAM gives int(0.128 + 0.5) = 0 columns, letterbox 1
]


@pytest.mark.parametrize(("h", "w", "s"), LETTERBOX_CASES)
def test_letterbox_equals_resize_longest_side(h: int, w: int, s: int) -> None:
    """letterbox's sizes equal SAM's in every non-degenerate case, and clamp to 1 otherwise."""
    box = letterbox(h, w, s)
    want_h, want_w = ResizeLongestSide.get_preprocess_shape(h, w, s)
    assert (box.valid_h, box.valid_w) == (max(1, want_h), max(1, want_w))


def test_letterbox_equals_resize_longest_side_sweep() -> None:
    """Same claim over many random sizes, including odd ones and extreme aspect ratios."""
    rng = np.random.default_rng(1)
    for s in (128, 256, 1024):
        for h, w in rng.integers(1, 5000, (2000, 2)):
            want = ResizeLongestSide.get_preprocess_shape(int(h), int(w), s)
            box = letterbox(int(h), int(w), s)
            if min(want) >= 1:
                assert (box.valid_h, box.valid_w) == want, (h, w, s)
            else:
                assert (box.valid_h, box.valid_w) == tuple(max(1, v) for v in want), (h, w, s)


# --------------------------------------------------------------------------- encoder


IMAGE_SIZES = [(50, 80), (80, 50), (256, 256), (300, 1), (7, 300), (513, 129)]


@pytest.mark.parametrize(("h", "w"), IMAGE_SIZES)
def test_preprocess_equals_predictor_input(tiny_sam: Sam, h: int, w: int) -> None:
    encoder = SamEncoder(tiny_sam)
    image = _image(h, w)
    want, input_size = _predictor_input(tiny_sam, image)
    got = encoder.preprocess(image)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == (3, encoder.image_size, encoder.image_size)
    assert_close(got, want[0], rtol=0, atol=0)
    box = letterbox(h, w, encoder.image_size)
    assert (box.valid_h, box.valid_w) == input_size


@pytest.mark.parametrize(("h", "w"), IMAGE_SIZES)
def test_embedding_equals_sam_predictor_features(tiny_sam: Sam, h: int, w: int) -> None:
    encoder = SamEncoder(tiny_sam)
    image = _image(h, w, seed=h * 1000 + w)
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    with torch.no_grad():
        got = encoder(encoder.preprocess(image)[None])
    assert_close(got, predictor.features)
    assert tuple(predictor.input_size) == (
        letterbox(h, w, encoder.image_size).valid_h,
        letterbox(h, w, encoder.image_size).valid_w,
    )


def test_batch_equals_per_image(tiny_sam: Sam) -> None:
    encoder = SamEncoder(tiny_sam)
    images = [_image(50, 80, seed=1), _image(120, 33, seed=2)]
    pixels = torch.stack([encoder.preprocess(im) for im in images])
    with torch.no_grad():
        batch = encoder(pixels)
        singles = [encoder(p[None]) for p in pixels]
    assert tuple(batch.shape) == (2, *encoder.embed_shape)
    for i, single in enumerate(singles):
        assert_close(batch[i : i + 1], single)
    # And each equals what SamPredictor computes for that image.
    for i, im in enumerate(images):
        predictor = SamPredictor(tiny_sam)
        predictor.set_image(im)
        assert_close(batch[i : i + 1], predictor.features)


def test_degenerate_strip_is_encoded(tiny_sam: Sam) -> None:
    """A 1x5000 strip: SAM's own transform asks PIL for a 0-row image; we keep one row."""
    image = _image(1, 5000)
    assert ResizeLongestSide.get_preprocess_shape(1, 5000, TINY.image_size)[0] == 0
    encoder = SamEncoder(tiny_sam)
    x = encoder.preprocess(image)
    assert tuple(x.shape) == (3, encoder.image_size, encoder.image_size)
    assert torch.isfinite(x).all()
    assert (x[:, 1:, :] == 0).all()  # only the single valid row carries pixels
    assert (x[:, :1, :] != 0).any()
    with torch.no_grad():
        assert tuple(encoder(x[None]).shape) == (1, *encoder.embed_shape)


def test_preprocess_accepts_non_contiguous_views(tiny_sam: Sam) -> None:
    """A BGR->RGB flip is a strided view; the result must equal the contiguous copy's."""
    encoder = SamEncoder(tiny_sam)
    bgr = _image(40, 60)
    view = bgr[..., ::-1]
    assert_close(encoder.preprocess(view), encoder.preprocess(view.copy()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((10, 10), np.uint8), "RGB"),
        (np.zeros((10, 10, 4), np.uint8), "RGB"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
    ],
)
def test_preprocess_rejects_other_inputs(tiny_sam: Sam, image: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamEncoder(tiny_sam).preprocess(image)


def test_forward_rejects_wrong_shape(tiny_sam: Sam) -> None:
    with pytest.raises(ValueError, match="expected pixels of shape"):
        SamEncoder(tiny_sam)(torch.zeros(1, 3, 64, 64))


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_save_load_round_trip(tiny_sam: Sam, tmp_path: Path, suffix: str) -> None:
    path = save_sam_checkpoint(tiny_sam, tmp_path / "sub" / f"tiny{suffix}")
    assert path == tmp_path / "sub" / f"tiny{suffix}" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left

    loaded = load_sam(SamSpec("tiny", str(path)))
    assert not loaded.training
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert_close(loaded.pixel_mean, tiny_sam.pixel_mean, rtol=0, atol=0)
    assert_close(loaded.pixel_std, tiny_sam.pixel_std, rtol=0, atol=0)
    want = tiny_sam.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k], rtol=0, atol=0)

    image = _image(50, 80)
    a, b = SamEncoder(tiny_sam), SamEncoder(loaded)
    with torch.no_grad():
        assert_close(b(b.preprocess(image)[None]), a(a.preprocess(image)[None]), rtol=0, atol=0)
    outs = []
    for sam in (tiny_sam, loaded):
        predictor = SamPredictor(sam)
        predictor.set_image(image)
        outs.append(predictor.predict(point_coords=np.array([[30, 20]]), point_labels=np.array([1])))
    # Scores and low-res logits: equal up to float rounding (a safetensors buffer's
    # alignment can change which SIMD path a kernel takes); the weights are exact.
    for x, y in zip(outs[0][1:], outs[1][1:]):
        assert_close(torch.from_numpy(x), torch.from_numpy(y))


def test_half_precision_checkpoint_loads_as_float32(tiny_sam: Sam, tmp_path: Path) -> None:
    half = build_sam_model(TINY)
    half.load_state_dict(tiny_sam.state_dict())
    path = save_sam_checkpoint(half.half(), tmp_path / "half.safetensors")
    loaded = load_sam(SamSpec("tiny", str(path)))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.parametrize("checkpoint", [None, "random"])
def test_random_init(checkpoint: str | None) -> None:
    sam = load_sam(SamSpec("tiny", checkpoint))
    assert isinstance(sam, Sam) and not sam.training
    assert SamEncoder(sam).embed_shape == embed_shape_for(TINY)


def _variant(**changes) -> SamArch:
    return dataclasses.replace(TINY, **changes)


@pytest.fixture()
def tiny_pth(tiny_sam: Sam, tmp_path: Path) -> Path:
    return save_sam_checkpoint(tiny_sam, tmp_path / "tiny.pth")


@pytest.mark.parametrize(
    ("variant", "fragments"),
    [
        # One more block: its keys are missing; the file is recognisably tiny.
        (_variant(encoder_depth=3), ["does not match", "tiny_variant", "missing", "blocks.2", "'tiny'"]),
        # Wider ViT: every encoder tensor has the wrong shape.
        (_variant(encoder_embed_dim=48), ["wrong shape", "patch_embed", "'tiny'"]),
        # Bigger canvas: position embedding and rel-pos tables change shape.
        (_variant(image_size=512), ["wrong shape", "pos_embed", "'tiny'"]),
        # Narrower embedding/decoder.
        (_variant(prompt_embed_dim=16, decoder_num_heads=2), ["wrong shape", "neck", "'tiny'"]),
        # Other blocks global: rel-pos table sizes differ.
        (_variant(encoder_global_attn_indexes=(0,)), ["wrong shape", "rel_pos", "'tiny'"]),
    ],
)
def test_wrong_arch_checkpoint(
    tiny_pth: Path, monkeypatch: pytest.MonkeyPatch, variant: SamArch, fragments: list[str]
) -> None:
    monkeypatch.setitem(SAM_ARCHS, "tiny_variant", variant)
    with pytest.raises(ModelLoadError) as info:
        load_sam(SamSpec("tiny_variant", str(tiny_pth)))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_decoder_only_mismatch_names_no_other_model(tiny_pth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder matches the requested arch, so 'looks like ...' would only confuse."""
    monkeypatch.setitem(SAM_ARCHS, "tiny_variant", _variant(decoder_mlp_dim=64))
    with pytest.raises(ModelLoadError) as info:
        load_sam(SamSpec("tiny_variant", str(tiny_pth)))
    assert "wrong shape" in str(info.value) and "mask_decoder" in str(info.value)
    assert "looks like" not in str(info.value)


def test_tiny_checkpoint_as_vit_b_is_refused_cheaply(tiny_pth: Path) -> None:
    """The key/shape check runs on a meta-built model: no 90M-parameter allocation."""
    with pytest.raises(ModelLoadError, match="does not match SAM model 'vit_b'.*looks like weights for SAM model 'tiny'"):
        load_sam(SamSpec("vit_b", str(tiny_pth)))


def test_unknown_variant_checkpoint_is_described(tmp_path: Path) -> None:
    """Weights of an arch we have no name for: the message spells out their sizes."""
    path = save_sam_checkpoint(build_sam_model(_variant(encoder_depth=4)), tmp_path / "deep.pth")
    with pytest.raises(ModelLoadError, match="encoder_depth=4"):
        load_sam(SamSpec("tiny", str(path)))


def _write(path: Path, payload) -> Path:
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return path


def _tiny_state() -> dict[str, torch.Tensor]:
    return build_sam_model(TINY).state_dict()


@pytest.mark.parametrize(
    ("name", "payload", "fragments"),
    [
        ("garbage.pth", b"\x00\x01not a checkpoint at all" * 10, ["cannot read", "garbage.pth"]),
        ("empty.pth", b"", ["cannot read"]),
        ("garbage.safetensors", b"\x00\x01not a checkpoint at all" * 10, ["cannot read", ".safetensors"]),
        ("truncated.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7f{", ["cannot read"]),
        ("tensor.pth", torch.zeros(3), ["not a state_dict", "Tensor"]),
        ("list.pth", [torch.zeros(3)], ["not a state_dict"]),
        ("mixed.pth", {"a": torch.zeros(1), "epoch": 3}, ["not a state_dict", "'epoch'"]),
        ("wrapped.pth", {"model": {"a": torch.zeros(1)}, "epoch": 3}, ["wrapped", "'model'"]),
        ("other.pth", {"weight": torch.zeros(1)}, ["does not match", "missing", "unexpected"]),
        (
            "prefixed.pth",
            "PREFIXED",  # replaced below: tiny keys with a 'module.' prefix
            ["does not match", "'module.'"],
        ),
    ],
)
def test_bad_checkpoint_files(tmp_path: Path, name: str, payload, fragments: list[str]) -> None:
    if isinstance(payload, str) and payload == "PREFIXED":
        payload = {f"module.{k}": v for k, v in _tiny_state().items()}
    path = _write(tmp_path / name, payload)
    with pytest.raises(ModelLoadError) as info:
        load_sam(SamSpec("tiny", str(path)))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        (SamSpec("vit_x"), ["unknown SAM model 'vit_x'", "tiny, vit_b, vit_h, vit_l"]),
        (SamSpec("ViT_B"), ["unknown SAM model", "vit_b"]),
        (SamSpec("tiny", "/nonexistent/sam_tiny.pth"), ["not found", "/nonexistent/sam_tiny.pth"]),
        (SamSpec("tiny", ""), ["empty SAM checkpoint path"]),
    ],
)
def test_bad_specs(spec: SamSpec, fragments: list[str]) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_sam(spec)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, UsageError)  # the CLI exits 2 with the message, no traceback


@pytest.mark.parametrize("checkpoint", [None, "TINY_FILE"])
def test_bad_device(tmp_path: Path, tiny_sam: Sam, checkpoint: str | None) -> None:
    if checkpoint == "TINY_FILE":
        checkpoint = str(save_sam_checkpoint(tiny_sam, tmp_path / "tiny.safetensors"))
    with pytest.raises(ModelLoadError, match="cannot put SAM on device 'cuda:99'"):
        load_sam(SamSpec("tiny", checkpoint), device="cuda:99")


def test_directory_as_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a file"):
        load_sam(SamSpec("tiny", str(tmp_path)))


class _Payload:
    """Unpickling this calls ``exec``, which writes a marker file: a stand-in for hostile code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _save_zip(obj, path: Path) -> None:
    torch.save(obj, path)


def _save_legacy(obj, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _save_raw_pickle(obj, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj))


def _load_zip_or_legacy(path: Path):
    return torch.load(path, weights_only=False)


def _load_raw_pickle(path: Path):
    return pickle.loads(path.read_bytes())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("save", "unsafe_load", "fragment"),
    [
        (_save_zip, _load_zip_or_legacy, "arbitrary code"),
        (_save_legacy, _load_zip_or_legacy, "arbitrary code"),
        (_save_raw_pickle, _load_raw_pickle, "cannot be loaded safely"),
    ],
)
def test_pickled_code_is_not_executed(tmp_path: Path, save, unsafe_load, fragment: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    state = _tiny_state()
    state["image_encoder.neck.0.weight"] = _Payload(marker)  # type: ignore[assignment]
    save(state, path)

    with pytest.raises(ModelLoadError) as info:
        load_sam(SamSpec("tiny", str(path)))
    assert fragment in str(info.value)
    assert not marker.exists()

    # Control: the payload is live, so its absence above is the loader's doing.
    unsafe_load(path)
    assert marker.read_text() == "pwned"
