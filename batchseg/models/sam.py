"""Segment Anything: model specs, safe checkpoint loading, and the image encoder.

batchseg runs SAM's heavy image encoder once per image (``batchseg embed``) and
stores the image embedding; the light prompt encoder and mask decoder run later
from the store. This module owns:

* ``SamArch`` / ``SAM_ARCHS``: the sizes that define a SAM model. ``vit_b``,
  ``vit_l`` and ``vit_h`` use segment-anything's official values; ``tiny`` is our
  small configuration for tests and for the toy model the project ships.
* ``build_sam_model``: a randomly initialised ``segment_anything.modeling.Sam``
  for any ``SamArch`` (segment-anything's own ``_build_sam`` hard-codes the image
  size, patch size and decoder width, so we assemble the parts ourselves).
* ``load_sam`` / ``save_sam_checkpoint``: weights in and out without ever
  unpickling arbitrary objects, with readable ``ModelLoadError`` messages.
* ``SamEncoder``: SAM's own preprocessing plus the image encoder, bit-for-bit
  equal to ``SamPredictor.set_image`` followed by ``predictor.features``.

Geometry (canvas size, patch size, embedding shape) is always read from the
model or its arch, never hard-coded, so ``tiny`` and ``vit_h`` go through the
same code.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import Tensor, nn

from batchseg.errors import ModelLoadError
from batchseg.io.files import atomic_path
from batchseg.io.geometry import letterbox
from batchseg.models.specs import SamSpec, check_sam_spec, is_sam_folder, unknown_sam_message  # noqa: F401  (torch-free home; re-exported)

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SAM_ARCHS",
    "SamArch",
    "SamEncoder",
    "SamSpec",
    "build_sam_model",
    "check_sam_spec",
    "is_sam_folder",
    "embed_shape_for",
    "load_sam",
    "save_sam_checkpoint",
]

# SAM's normalisation constants (ImageNet mean/std on the 0..255 scale). They are
# non-persistent buffers of ``Sam``, so checkpoints never carry them.
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

# Spellings of SamSpec.checkpoint that ask for random weights.
_RANDOM = "random"


@dataclass(frozen=True)
class SamArch:
    """The sizes that define a SAM model.

    The first seven fields are the ones segment-anything varies or hard-codes in
    ``build_sam.py``; the fields after them are hard-coded there too, and default
    to the official values so ``vit_b``/``vit_l``/``vit_h`` need not spell them out.

    Attributes:
        encoder_embed_dim: ViT width.
        encoder_depth: number of ViT blocks.
        encoder_num_heads: attention heads per ViT block.
        encoder_global_attn_indexes: blocks that attend globally; the others use
            windowed attention of ``window_size`` tokens per side.
        image_size: side of the square input canvas ``S`` (pixels).
        vit_patch_size: patch side ``p``; the embedding grid is ``S // p`` per side.
        prompt_embed_dim: channels ``C`` of the image embedding, and width of the
            prompt encoder and mask decoder.
        window_size: windowed-attention side in tokens (official: 14).
        decoder_mlp_dim: MLP width inside the mask decoder's two-way transformer.
        decoder_num_heads: attention heads in the mask decoder. ``prompt_embed_dim``
            must be divisible by ``2 * decoder_num_heads`` (cross attention halves
            the width), and by 8 (the output upscaling divides it by 8).
        iou_head_hidden_dim: hidden width of the mask-quality (IoU) head.
        mask_in_chans: hidden channels of the prompt encoder's mask-input branch
            (must be divisible by 4).
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    vit_patch_size: int = 16
    prompt_embed_dim: int = 256
    window_size: int = 14
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


SAM_ARCHS: dict[str, SamArch] = {
    # Official sizes, from segment_anything/build_sam.py.
    "vit_b": SamArch(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_l": SamArch(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamArch(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # Our small config. A 256 canvas with 16-pixel patches gives a 16x16 grid,
    # which windows of 8 tile exactly (no window padding), with one windowed and
    # one global block so both attention paths are exercised. The embedding has
    # 32 channels (8x less to store than 256): 32 is the smallest width that keeps
    # the decoder valid with 4 heads (32 / (2*4) = 4 dims per cross-attention
    # head; 32 // 8 = 4 channels after upscaling). Checkpoints of the shipped toy
    # model depend on these numbers: change them only together with that model.
    "tiny": SamArch(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        image_size=256,
        vit_patch_size=16,
        prompt_embed_dim=32,
        window_size=8,
        decoder_mlp_dim=128,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
        mask_in_chans=16,
    ),
}


def embed_shape_for(arch: SamArch) -> tuple[int, int, int]:
    """Image-embedding shape ``(C, h, w)`` that ``arch`` produces, without building it.

    The patch embedding is a convolution with kernel = stride = ``p`` and no
    padding, and the neck keeps the spatial size, so ``h = w = S // p``.
    For ``vit_b`` this is ``(256, 64, 64)``.
    """
    side = arch.image_size // arch.vit_patch_size
    return (arch.prompt_embed_dim, side, side)


def _check_arch(arch: SamArch) -> None:
    """Raise ``ValueError`` for sizes that segment-anything would reject late or obscurely."""
    problems: list[str] = []
    if arch.encoder_embed_dim % arch.encoder_num_heads:
        problems.append("encoder_embed_dim must be divisible by encoder_num_heads")
    if arch.image_size % arch.vit_patch_size:
        # A remainder would be silently cropped by the patch convolution and the
        # absolute position embedding would no longer match the token grid.
        problems.append("image_size must be a multiple of vit_patch_size")
    if any(not 0 <= i < arch.encoder_depth for i in arch.encoder_global_attn_indexes):
        problems.append("encoder_global_attn_indexes must lie in [0, encoder_depth)")
    if arch.prompt_embed_dim % 8 or arch.prompt_embed_dim % (2 * arch.decoder_num_heads):
        problems.append("prompt_embed_dim must be divisible by 8 and by 2 * decoder_num_heads")
    if arch.mask_in_chans % 4 or arch.mask_in_chans < 4:
        problems.append("mask_in_chans must be a positive multiple of 4")
    if problems:
        raise ValueError(f"invalid SamArch {arch}: " + "; ".join(problems))


def build_sam_model(arch: SamArch) -> Sam:
    """Build a randomly initialised SAM with ``arch``'s sizes, in eval mode, on the CPU.

    Mirrors ``segment_anything.build_sam._build_sam`` part for part (so an official
    arch gives exactly the official parameter names and shapes) but takes every size
    from ``arch`` instead of hard-coding them.

    Under a ``torch.device("meta")`` context this allocates nothing, which
    ``load_sam`` uses to check a checkpoint before paying for the model.
    """
    _check_arch(arch)
    grid = arch.image_size // arch.vit_patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.vit_patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    sam.eval()
    return sam


# --------------------------------------------------------------------------- saving


def save_sam_checkpoint(model: Sam, path: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` to ``path`` and return it as a ``Path``.

    ``.safetensors`` paths get safetensors; anything else gets ``torch.save`` of a
    plain ``{name: Tensor}`` dict (what SAM ships, loadable with ``weights_only``).
    Tensors are saved from the CPU in their current dtype. The file is written
    under a temporary name and renamed into place, so a crash never leaves a
    half-written checkpoint under the final name.
    """
    path = Path(path)
    # clone(): safetensors refuses tensors that share storage, and a state_dict of a
    # model on the GPU must be moved anyway.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    return path


# --------------------------------------------------------------------------- loading


def _short(exc: BaseException, limit: int = 300) -> str:
    """First line of an exception's message, truncated: enough to diagnose, no wall of text."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a checkpoint file into a CPU ``{name: Tensor}`` dict without unpickling code.

    Raises ``ModelLoadError`` for anything that is not such a dict.
    """
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own Rust-side error types
            raise ModelLoadError(
                f"cannot read SAM checkpoint {path}: not a valid .safetensors file ({_short(exc)})"
            ) from exc
    else:
        try:
            # weights_only=True: the unpickler only rebuilds tensors and plain
            # containers, so a hostile file cannot run code (DESIGN rule 6).
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            if "Unsupported global" in text:
                # The file names a Python callable/class to rebuild: exactly what a
                # hostile pickle does, and what the weights-only unpickler refuses.
                raise ModelLoadError(
                    f"refusing to load SAM checkpoint {path}: it contains pickled Python "
                    "objects other than tensors, and unpickling them could run arbitrary "
                    "code. Re-save it as a plain state_dict (torch.save(model.state_dict(), "
                    "...)) or as .safetensors."
                ) from exc
            # torch's message is a long advice text; its last useful part names the cause.
            detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
            raise ModelLoadError(
                f"cannot read SAM checkpoint {path}: not a PyTorch checkpoint, or one holding "
                f"data that cannot be loaded safely ({_short(ValueError(detail))})"
            ) from exc
        except Exception as exc:  # truncated zip, garbage bytes, I/O errors, ...
            raise ModelLoadError(
                f"cannot read SAM checkpoint {path}: not a readable PyTorch checkpoint "
                f"({type(exc).__name__}: {_short(exc)})"
            ) from exc

    if not isinstance(state, Mapping):
        raise ModelLoadError(
            f"SAM checkpoint {path} holds a {type(state).__name__}, not a state_dict "
            "(a dict of parameter name -> tensor)"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        hint = ""
        wrapped = [k for k in ("model", "state_dict", "module") if isinstance(state.get(k), Mapping)]
        if wrapped:
            hint = f" It looks wrapped: the weights may be under key {wrapped[0]!r}; save that dict instead."
        shown = ", ".join(repr(k) for k in bad[:5])
        raise ModelLoadError(
            f"SAM checkpoint {path} is not a state_dict: entries {shown} are not "
            f"name -> tensor pairs.{hint}"
        )
    return dict(state)


_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def _infer_arch(state: Mapping[str, Tensor]) -> SamArch | None:
    """Guess the encoder sizes a SAM state_dict was saved from, or ``None`` if it isn't one.

    Only the fields that shape the image encoder and its neck are recovered
    (the decoder fields keep their defaults); enough to say which model a
    checkpoint is for. Reads: patch conv ``(D, 3, p, p)``, position embedding
    ``(1, S/p, S/p, D)``, neck conv ``(C, D, 1, 1)``, and per block the relative
    position table ``(2*L - 1, D/heads)``, where ``L`` is the grid side for
    global blocks and the window side for windowed ones.
    """
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]
        pos = state["image_encoder.pos_embed"]
        neck = state["image_encoder.neck.0.weight"]
        embed_dim, p = int(patch.shape[0]), int(patch.shape[-1])
        grid = int(pos.shape[1])
        depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
        spans = [int(state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
    except (KeyError, ValueError, IndexError):
        return None
    global_idx = tuple(i for i, n in enumerate(spans) if n == 2 * grid - 1)
    windowed = [n for n in spans if n != 2 * grid - 1]
    window = (windowed[0] + 1) // 2 if windowed else 14
    return SamArch(
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=max(1, embed_dim // max(1, head_dim)),
        encoder_global_attn_indexes=global_idx,
        image_size=grid * p,
        vit_patch_size=p,
        prompt_embed_dim=int(neck.shape[0]),
        window_size=window,
    )


_ENCODER_FIELDS = (
    "encoder_embed_dim",
    "encoder_depth",
    "encoder_num_heads",
    "encoder_global_attn_indexes",
    "image_size",
    "vit_patch_size",
    "prompt_embed_dim",
    "window_size",
)


def _describe(arch: SamArch) -> str:
    return ", ".join(f"{f}={getattr(arch, f)}" for f in _ENCODER_FIELDS)


def _guess_name(state: Mapping[str, Tensor], requested: str) -> str:
    """A phrase naming the arch a state_dict seems to be for, or '' if unknown.

    Says nothing when the encoder matches ``requested`` itself (then only the
    decoder differs, and naming the requested model would confuse).
    """
    found = _infer_arch(state)
    if found is None:
        return ""
    names = [
        name
        for name, arch in SAM_ARCHS.items()
        if all(getattr(arch, f) == getattr(found, f) for f in _ENCODER_FIELDS)
    ]
    if requested in names:
        return ""
    if names:
        return f" It looks like weights for SAM model {names[0]!r}."
    return f" It looks like weights for a SAM encoder with {_describe(found)}."


def _check_fit(path: Path, name: str, state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Raise ``ModelLoadError`` unless ``state`` has exactly ``expected``'s keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (model wants {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label}: " + ", ".join(items[:3]) + more)
    hint = _guess_name(state, name)
    if not hint and unexpected:
        # e.g. "module." from DataParallel or "model." from a training wrapper.
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected}
        if len(prefixes) == 1:
            prefix = prefixes.pop()
            if any(k[len(prefix):] in expected for k in unexpected):
                hint = f" Its keys carry an extra {prefix!r} prefix: was it saved from a wrapped model?"
    raise ModelLoadError(
        f"SAM checkpoint {path} does not match SAM model {name!r} "
        f"({_describe(SAM_ARCHS[name])}): " + "; ".join(parts) + "." + hint
    )


def load_sam(spec: SamSpec, device: str | torch.device = "cpu") -> Sam:
    """Build ``spec.model``'s arch, load ``spec.checkpoint`` safely, return it in eval mode on ``device``.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., map_location="cpu", weights_only=True)``, which never runs
    code stored in the file. The checkpoint's keys and shapes are checked against
    the arch before any real parameter memory is allocated (the arch is first built
    on the ``meta`` device), then loaded strictly by assignment, so a ViT-H is
    neither randomly initialised nor held twice. Checkpoint tensors are cast to the
    model's dtype (float32), so fp16/bf16 checkpoints load too.

    Raises:
        ModelLoadError: unknown model name (the message lists the valid ones),
            missing or unreadable checkpoint, a file with pickled objects other
            than tensors, or weights whose keys/shapes do not fit the arch (the
            message says which model they seem to be for, when it can tell).
    """
    arch = SAM_ARCHS.get(spec.model)
    if arch is None:
        if is_sam_folder(spec.model):
            from batchseg.models.sam_folder import load_sam_folder

            if spec.checkpoint not in (None, _RANDOM):
                raise ModelLoadError(f"SAM model folder {spec.model} carries its own weights; give no checkpoint")
            return load_sam_folder(Path(spec.model), device)
        raise ModelLoadError(unknown_sam_message(spec.model))

    if spec.checkpoint is None or spec.checkpoint == _RANDOM:
        return _to_device(build_sam_model(arch), device)

    if not spec.checkpoint.strip():
        raise ModelLoadError(
            f"empty SAM checkpoint path for model {spec.model!r}; give a file, or "
            f"None / {_RANDOM!r} for random weights"
        )
    path = Path(os.path.expanduser(spec.checkpoint))
    if not path.exists():
        raise ModelLoadError(f"SAM checkpoint not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"SAM checkpoint is not a file: {path}")
    state = _read_state_dict(path)

    # Build on the meta device: parameter names and shapes without memory or init.
    with torch.device("meta"):
        sam = build_sam_model(arch)
    expected = sam.state_dict()
    _check_fit(path, spec.model, state, expected)

    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    sam.load_state_dict(state, strict=True, assign=True)
    # pixel_mean/std are non-persistent (never in a checkpoint); set them here so
    # they are real tensors whatever device the meta build left them on.
    sam.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
    sam.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
    still_meta = [n for n, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    if still_meta:  # a segment-anything change added state we do not restore: a bug here, not the user's
        raise RuntimeError(f"tensors left unmaterialised after loading SAM: {still_meta[:5]}")
    return _to_device(sam, device)


def _to_device(sam: Sam, device: str | torch.device) -> Sam:
    """Move to ``device`` in eval mode; a bad or absent device is a ModelLoadError, not a traceback."""
    try:
        return sam.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as exc:  # torch's errors for bad/absent devices
        raise ModelLoadError(f"cannot put SAM on device {str(device)!r}: {_short(exc)}") from exc


# --------------------------------------------------------------------------- encoder


def _encoder_embed_shape(encoder: ImageEncoderViT) -> tuple[int, int, int]:
    """``(C, h, w)`` the encoder outputs, read from its layers (no forward pass).

    ``C`` is the neck's output width; ``h = w`` follows the patch convolution's
    output-size formula on an ``img_size`` square (the neck keeps spatial size).
    """
    conv: nn.Conv2d = encoder.patch_embed.proj
    neck_conv: nn.Conv2d = encoder.neck[0]
    sides = []
    for k, s, p, d in zip(conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        sides.append((encoder.img_size + 2 * p - d * (k - 1) - 1) // s + 1)
    return (int(neck_conv.out_channels), int(sides[0]), int(sides[1]))


def _cpu_stat(value: Tensor, default: tuple[float, float, float]) -> Tensor:
    """``(3, 1, 1)`` float32 CPU copy of a normalisation buffer.

    A model built on the meta device (only to read its geometry) has no values;
    SAM's constants stand in so such an encoder can still be constructed.
    """
    if value.is_meta:
        return torch.tensor(default, dtype=torch.float32).view(-1, 1, 1)
    return value.detach().to("cpu", torch.float32).reshape(-1, 1, 1).clone()


def sam_preprocess(image: np.ndarray, image_size: int, pixel_mean: Tensor, pixel_std: Tensor) -> Tensor:
    """SAM's preprocessing of one image (see ``SamEncoder.preprocess``), for any canvas and statistics.

    Args:
        image: ``(H, W, 3)`` uint8 RGB array.
        image_size: canvas side ``S``.
        pixel_mean, pixel_std: ``(3, 1, 1)`` float32 CPU tensors (0..255 scale).

    Returns:
        ``(3, S, S)`` float32 CPU tensor, the image at the top left, zero padding elsewhere.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    h, w = image.shape[:2]
    box = letterbox(h, w, image_size)
    # ascontiguousarray: PIL needs a contiguous buffer (e.g. after a BGR flip view).
    pil = Image.fromarray(np.ascontiguousarray(image))
    resized = np.asarray(pil.resize((box.valid_w, box.valid_h), Image.Resampling.BILINEAR))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1)  # (3, h', w') uint8
    # uint8 - float32 promotes to float32, the same arithmetic as Sam.preprocess.
    x = (x - pixel_mean) / pixel_std
    x = nn.functional.pad(x, (0, image_size - box.valid_w, 0, image_size - box.valid_h))
    return x.contiguous()


class SamEncoder(nn.Module):
    """SAM's own preprocessing plus its image encoder.

    ``preprocess`` (CPU, per image, in a data loader) then ``forward`` (batched, on
    the accelerator) equals ``SamPredictor(sam).set_image(image)`` followed by
    ``predictor.features``.

    The wrapper shares ``sam.image_encoder`` (moving this module moves that
    encoder); the prompt encoder and mask decoder are not part of it.

    Attributes:
        image_size: canvas side ``S`` (``sam.image_encoder.img_size``).
        embed_shape: ``(C, h, w)`` of one image embedding, read from the model,
            e.g. ``(256, 64, 64)`` for vit_b.
    """

    image_size: int
    embed_shape: tuple[int, int, int]

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.image_size = int(sam.image_encoder.img_size)
        # A distilled CNN encoder states its own shape; SAM's ViT is read from its layers.
        own = getattr(sam.image_encoder, "embed_shape", None)
        self.embed_shape = tuple(own) if own is not None else _encoder_embed_shape(sam.image_encoder)
        # Plain CPU float32 copies (not buffers): preprocess runs on the CPU in
        # loader processes however the module itself is placed.
        self._pixel_mean = _cpu_stat(sam.pixel_mean, PIXEL_MEAN)
        self._pixel_std = _cpu_stat(sam.pixel_std, PIXEL_STD)

    def preprocess(self, image: np.ndarray) -> Tensor:
        """Turn one RGB image into the encoder's input, exactly as ``SamPredictor.set_image``.

        Steps: resize the longest side to ``S`` with PIL bilinear on uint8 (what
        ``ResizeLongestSide.apply_image`` does through torchvision), normalise with
        SAM's pixel mean/std, zero-pad bottom/right to ``S x S`` (``Sam.preprocess``).
        The resized size comes from ``batchseg.io.geometry.letterbox``, which equals
        ``ResizeLongestSide.get_preprocess_shape`` except that no side drops to 0
        (where segment-anything would fail, e.g. on a 1x5000 strip).

        Args:
            image: ``(H, W, 3)`` uint8 RGB array.

        Returns:
            ``(3, S, S)`` float32 CPU tensor; the image occupies rows
            ``[0, valid_h)`` and columns ``[0, valid_w)`` of ``letterbox(H, W, S)``.
        """
        return sam_preprocess(image, self.image_size, self._pixel_mean, self._pixel_std)

    def forward(self, pixels: Tensor) -> Tensor:
        """Encode a batch of preprocessed images.

        Does not disable autograd or set a dtype: callers wrap it in
        ``torch.inference_mode()`` / autocast as their device allows (a distilling
        student may need gradients elsewhere in the graph).

        Args:
            pixels: ``(B, 3, S, S)`` float tensor from ``preprocess``, on the
                encoder's device.

        Returns:
            ``(B, C, h, w)`` image embeddings, ``(C, h, w) == embed_shape``.
        """
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"expected pixels of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        return self.image_encoder(pixels)
