"""CLIP through open_clip: loading, MaskCLIP dense features and CLIP preprocessing.

``load_dense_clip(ClipSpec(...))`` turns a user's model spec into a frozen
:class:`DenseClip`, whose forward returns MaskCLIP dense features in the joint
image-text space, the last-block keys used for key smoothing, and the model's own
global image embedding, all from one pass over the image tower.

ViT dense forms (last residual block, x = its input tokens; see DESIGN.md
"Dense CLIP features: the exact forms" and the official MaskCLIP
``mmseg/models/backbones/vit.py``, ``attn2ffn`` branch):

* ``"official"`` (MaskCLIP): ``v = x + ls_1(out_proj(v))``, ``v = v + ls_2(mlp(ln_2(v)))``,
  then ``ln_post`` and ``@ proj``. This is exactly the block run with attention
  restricted to the diagonal (softmax of a single logit is 1), which the tests use
  as the reference.
* ``"clear"`` (ClearCLIP): ``ln_post(out_proj(v)) @ proj``: no residual, no MLP.

Keys are ``out_proj(k)`` in both forms. ResNet towers: see
:mod:`batchseg.models.clip_resnet`; timm (ConvNeXt) towers: :mod:`batchseg.models.clip_timm`.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file
from torch import Tensor, nn

from batchseg.errors import ModelLoadError
from batchseg.io.files import atomic_path, write_text_atomic
from batchseg.models.dense_heads import ClipTokens
from batchseg.models.clip_resnet import (
    RESNET_STRIDE,
    check_resnet,
    is_modified_resnet,
    resnet_features,
    tokens_to_map,
)
from batchseg.models.clip_timm import check_timm, check_timm_config, is_timm_tower, timm_dims, timm_features
from batchseg.models.clip_timm import timm_native_grid, timm_stride
from batchseg.models.clip_preprocess import ClipPreprocess, model_preprocess, preprocess_clip  # noqa: F401  (re-exported)
from batchseg.models.specs import LOCAL_DIR, ClipSpec  # noqa: F401  (torch-free home; re-exported)

DENSE_FORMS = ("official", "clear")
RANDOM = "random"
HF_HUB = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"  # first in open_clip 3.3's local-dir preference order
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip's local-dir loader looks for
# Custom attention-block options that change the value path (or make "keys" ambiguous).
_CUSTOM_BLOCK_OPTIONS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn")


class DenseClipOutput(NamedTuple):
    """What :meth:`DenseClip.forward` returns (float dtype of the tower, or autocast's).

    dense: (B, D, g, g) MaskCLIP dense features in the joint (text) space, D = embed dim.
    keys: (B, K, g, g) last-block keys for key smoothing (ViT: K = width; ResNet:
        K = ``k_proj`` output dim).
    global_: (B, D) the model's own image embedding, unnormalised
        (equals ``model.encode_image`` on the same input).
    """

    dense: Tensor
    keys: Tensor
    global_: Tensor


class DenseClip(nn.Module):
    """A frozen open_clip model that returns dense, keys and global features in one pass.

    Construct with :func:`load_dense_clip`, or wrap an already built open_clip model
    directly. The wrapper takes ownership of ``model``: it is put in eval mode, frozen,
    and, when ``canvas`` differs from the training size, its positional embedding is
    interpolated in place once (so ``model.encode_image`` also works at ``canvas``).
    The full model (text tower included) stays reachable as ``self.model`` so text
    embeddings can come from the very same weights.

    Attributes:
        canvas: side of the square input in pixels. patch: stride of the dense grid in
        canvas pixels. grid: ``canvas // patch``. dense_dim: D. key_dim: K.
        mean, std: the model's normalisation (RGB, for pixels in [0, 1]).
        preprocess: all of the model's preprocessing (:class:`ClipPreprocess`: also the
        resize filter and the letterbox fill); its mean and std are ``mean`` and ``std``.
        dense_form: ``"official"`` or ``"clear"``. kind: ``"vit"``, ``"resnet"`` or ``"timm"``.
    """

    def __init__(
        self,
        model: nn.Module,
        canvas: int | None = None,
        *,
        mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
        std: Sequence[float] = open_clip.OPENAI_DATASET_STD,
        dense_form: str = "official",
        preprocess: ClipPreprocess | None = None,
    ) -> None:
        super().__init__()
        if dense_form not in DENSE_FORMS:
            raise ModelLoadError(f"unknown dense form {dense_form!r}; choose one of {', '.join(DENSE_FORMS)}")
        visual = getattr(model, "visual", None)
        if visual is not None and is_modified_resnet(visual):
            check_resnet(visual)
            self.kind = "resnet"
            patch = RESNET_STRIDE
            side = round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
            native = (side, side)
            self.dense_dim = visual.attnpool.c_proj.out_features
            self.key_dim = visual.attnpool.k_proj.out_features
            self.token_dim = visual.attnpool.v_proj.in_features
            if dense_form == "clear":
                raise ModelLoadError("dense form 'clear' (ClearCLIP) is defined for ViT towers only; use 'official'")
        elif visual is not None and is_timm_tower(visual):  # e.g. ConvNeXt: see batchseg.models.clip_timm
            check_timm(visual)
            self.kind = "timm"
            patch, native = timm_stride(visual), timm_native_grid(visual)
            self.dense_dim, self.key_dim = timm_dims(visual)
            self.token_dim = self.key_dim  # the stored tokens are the trunk's last feature map
            if dense_form == "clear":
                raise ModelLoadError("dense form 'clear' (ClearCLIP) is defined for ViT towers only; use 'official'")
        else:
            _check_vit(visual)
            self.kind = "vit"
            patch = visual.patch_size[0]
            native = tuple(visual.grid_size)
            self.dense_dim = visual.proj.shape[1]
            self.key_dim = self.token_dim = visual.transformer.width
        if canvas is None:
            if native[0] != native[1]:
                raise ModelLoadError(f"the model was trained on a non-square grid {native}; pass a canvas size")
            canvas = native[0] * patch
        if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < patch or canvas % patch:
            raise ModelLoadError(
                f"canvas must be a positive multiple of the model's patch size {patch}, got {canvas!r}"
            )
        self.canvas, self.patch, self.grid = canvas, patch, canvas // patch
        self.token_grid = self.grid  # stored tokens and CLIP's dense grid coincide for ViT and ResNet
        if preprocess is not None:
            mean, std = preprocess.mean, preprocess.std
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.preprocess = preprocess or ClipPreprocess(self.mean, self.std)
        self.dense_form = dense_form
        _resize_positional_embedding(visual, self.kind, native, self.grid)
        model.eval()
        model.requires_grad_(False)
        self.model = model

    def train(self, mode: bool = True) -> "DenseClip":
        """Stay in eval mode: a frozen feature extractor must never switch BatchNorm or
        dropout to training behaviour (``train()`` calls from a parent module are ignored)."""
        return super().train(False)

    def forward(self, pixels: Tensor) -> DenseClipOutput:
        """(B, 3, canvas, canvas) normalised float pixels -> :class:`DenseClipOutput`.

        Pixels are cast to the tower's weight dtype (so a ``.half()`` model takes float32
        input); under autocast the weights stay float32 and autocast picks the dtype.
        """
        self._check_pixels(pixels)
        visual = self.model.visual
        if self.kind == "timm":
            return DenseClipOutput(*timm_features(visual, pixels))
        pixels = pixels.to(_input_dtype(visual))
        if self.kind == "resnet":
            return DenseClipOutput(*resnet_features(visual, pixels))
        return self._vit_forward(visual, pixels)

    def encode_tokens(self, pixels: Tensor) -> ClipTokens:
        """(B, 3, canvas, canvas) normalised pixels -> what ``embed`` stores (:class:`ClipTokens`).

        ViT: the last block's input tokens (patch grid and class token) and the global
        embedding; ResNet: the layer4 map and the attention-pooled embedding. Every
        dense head (:mod:`batchseg.models.dense_heads`) is a function of these.
        """
        self._check_pixels(pixels)
        visual = self.model.visual
        pixels = pixels.to(_input_dtype(visual))
        if self.kind == "resnet":
            f = visual.stem(pixels)
            f = visual.layer4(visual.layer3(visual.layer2(visual.layer1(f))))
            return ClipTokens(f, None, visual.attnpool(f))
        if self.kind != "vit":
            from batchseg.models.clip_timm import timm_tokens

            return ClipTokens(*timm_tokens(visual, pixels))
        x, y = self._vit_last_block_io(visual, pixels)
        pooled, _ = visual._pool(y)
        return ClipTokens(tokens_to_map(x[:, 1:], self.grid, self.grid), x[:, 0], pooled @ visual.proj)

    def _vit_last_block_io(self, visual: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(input, output) of the last block, (B, 1 + g*g, W) each, batch first."""
        transformer = visual.transformer
        x = visual._embeds(pixels)  # (B, 1 + g*g, W): class token first, positions added, ln_pre
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # blocks built with batch_first=False expect (L, B, W)
        for block in transformer.resblocks[:-1]:
            x = block(x)
        y = transformer.resblocks[-1](x)
        if not transformer.batch_first:
            x, y = x.transpose(0, 1), y.transpose(0, 1)
        return x, y

    def _check_pixels(self, pixels: Tensor) -> None:
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.canvas, self.canvas):
            raise ValueError(
                f"expected pixels of shape (B, 3, {self.canvas}, {self.canvas}), got {tuple(pixels.shape)}"
            )

    def _vit_forward(self, visual: nn.Module, pixels: Tensor) -> DenseClipOutput:
        last = visual.transformer.resblocks[-1]
        x, y = self._vit_last_block_io(visual, pixels)  # y: the normal last block, the global path
        pooled, _ = visual._pool(y)  # same pooling/ln_post order as VisionTransformer.forward
        global_ = pooled @ visual.proj

        # Every step of the value path is per token, so the class token can go first.
        x = x[:, 1:]
        keys, value = _keys_and_values(last, x)
        if self.dense_form == "official":
            t = x + last.ls_1(value)
            t = t + last.ls_2(last.mlp(last.ln_2(t)))
        else:
            t = value
        dense = visual.ln_post(t) @ visual.proj  # (B, g*g, D)
        return DenseClipOutput(
            tokens_to_map(dense, self.grid, self.grid), tokens_to_map(keys, self.grid, self.grid), global_
        )


def _input_dtype(visual: nn.Module) -> torch.dtype:
    return next(visual.parameters()).dtype


def _keys_and_values(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``out_proj(k)`` and ``out_proj(v)`` of ``block`` for (B, L, W) tokens ``x``.

    Both go through ``out_proj`` as in the official MaskCLIP code. The query rows of
    ``in_proj_weight`` are skipped: attention weights are never formed.
    """
    attn = block.attn
    width = x.shape[-1]
    bias = attn.in_proj_bias
    kv = F.linear(block.ln_1(x), attn.in_proj_weight[width:], None if bias is None else bias[width:])
    kv = F.linear(kv.unflatten(-1, (2, width)), attn.out_proj.weight, attn.out_proj.bias)  # (B, L, 2, W)
    return kv[..., 0, :], kv[..., 1, :]


def _check_vit(visual: nn.Module | None) -> None:
    """Raise :class:`ModelLoadError` unless ``visual`` is an open_clip VisionTransformer
    variant whose value path this module computes exactly."""
    needed = ("conv1", "transformer", "positional_embedding", "ln_post", "proj", "_embeds", "_pool")
    needed += ("grid_size", "patch_size")
    if visual is None or not all(hasattr(visual, n) for n in needed):
        name = type(visual).__name__
        raise ModelLoadError(
            f"unsupported CLIP image tower {name}: batchseg computes dense features for open_clip's "
            "own VisionTransformer and ModifiedResNet towers and its timm CNN towers (e.g. ConvNeXt) only"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ModelLoadError("CLIP towers with an attentional pooler (CoCa-style) are not supported")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        raise ModelLoadError(f"CLIP ViT pool_type {visual.pool_type!r} is not supported (need 'tok' or 'avg')")
    if visual.proj is None:
        raise ModelLoadError("CLIP ViT has no output projection (proj), so there is no joint space")
    ph, pw = visual.patch_size
    if ph != pw:
        raise ModelLoadError(f"non-square ViT patches {ph}x{pw} are not supported")
    gh, gw = visual.grid_size
    if visual.positional_embedding.shape[0] != gh * gw + 1:
        raise ModelLoadError("CLIP ViT positional embedding is not one class token plus the patch grid")
    last = visual.transformer.resblocks[-1]
    attn = getattr(last, "attn", None)
    if hasattr(last, "ln_1_kv") or not all(hasattr(last, n) for n in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")):
        raise ModelLoadError(f"unsupported ViT block {type(last).__name__}")
    if isinstance(attn, nn.MultiheadAttention):
        plain = attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
    else:  # open_clip's own Attention (CustomResidualAttentionBlock)
        plain = (
            getattr(attn, "in_proj_weight", None) is not None
            and getattr(attn, "logit_scale", 1) is None
            and getattr(attn, "head_scale", 1) is None
            and all(isinstance(getattr(attn, n, None), nn.Identity) for n in ("ln_q", "ln_k", "ln_inner"))
            and isinstance(getattr(last, "ln_attn", nn.Identity()), nn.Identity)
        )
    if not plain:
        raise ModelLoadError(
            f"unsupported attention variant in the last ViT block ({type(attn).__name__}: one of "
            f"{', '.join(_CUSTOM_BLOCK_OPTIONS)} or separate q/k/v projections); the MaskCLIP value path is defined "
            "for plain multi-head attention"
        )


def interpolate_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize a (1 + gh*gw, C) positional embedding to (1 + nh*nw, C).

    The class-token row is kept as is; the grid part is resized bicubically
    (align_corners=False, antialiased when shrinking, as open_clip's
    ``resize_pos_embed``) in float32 and cast back. Returns ``pos`` itself when the
    grids are equal.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    (oh, ow), (nh, nw) = old_grid, new_grid
    grid = pos[1:].reshape(1, oh, ow, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(nh * nw, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


@torch.no_grad()
def _resize_positional_embedding(visual: nn.Module, kind: str, native: tuple[int, int], grid: int) -> None:
    """Interpolate the tower's positional embedding to ``grid x grid`` in place, once,
    and update the size attributes open_clip reads, so the model is self-consistent."""
    if tuple(native) == (grid, grid):
        return
    if kind == "timm":  # no positional embedding: a CNN trunk runs at any multiple of its stride
        visual.image_size = (grid * timm_stride(visual),) * 2
        return
    owner = visual.attnpool if kind == "resnet" else visual
    new = interpolate_pos_embed(owner.positional_embedding.detach(), native, (grid, grid))
    owner.positional_embedding = nn.Parameter(new, requires_grad=False)
    canvas = grid * (RESNET_STRIDE if kind == "resnet" else visual.patch_size[0])
    if kind == "vit":
        visual.grid_size = (grid, grid)
        visual.image_size = (canvas, canvas)
    else:
        visual.image_size = canvas
    if isinstance(getattr(visual, "preprocess_cfg", None), dict):
        visual.preprocess_cfg["size"] = canvas


def load_dense_clip(
    spec: ClipSpec, canvas: int | None = None, device: str | torch.device = "cpu", dense_form: str = "official"
) -> DenseClip:
    """Build or load the open_clip model named by ``spec`` and wrap it in :class:`DenseClip`.

    ``canvas`` None means the model's own image size; otherwise positional embeddings
    are interpolated once here. Checkpoints load through open_clip with
    ``weights_only=True`` (or safetensors), mapped to the CPU and then copied into the
    model on ``device``. For pretrained tags trained with QuickGELU (OpenAI's) the
    activation follows the tag, even under a GELU model name. Every user mistake
    (unknown name or tag, missing folder/files, unreadable checkpoint, failed download,
    unsupported tower, bad canvas) raises :class:`ModelLoadError` with a readable message.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"invalid device {device!r}: {e}") from e
    source, model_cfg = _resolve(spec)
    if model_cfg is not None:
        _check_config(model_cfg)
    model = _create(spec, source, device)
    return DenseClip(model, canvas, dense_form=dense_form, preprocess=model_preprocess(model, spec.model, spec.pretrained))


def _resolve(spec: ClipSpec) -> tuple[str, dict | None]:
    """Check ``spec`` before anything is built or downloaded.

    Returns (source, model_cfg): source is one of "local-dir", "random", "tag", "file",
    "hub"; model_cfg is the architecture config when it is available locally.
    """
    if spec.model.startswith(HF_HUB):
        if spec.pretrained not in (None, RANDOM):
            raise ModelLoadError(
                f"an hf-hub: model loads its own weights; leave pretrained unset (or 'random'), not {spec.pretrained!r}"
            )
        return ("random" if spec.pretrained == RANDOM else "hub"), None
    if spec.model.startswith(LOCAL_DIR):
        path = Path(spec.model[len(LOCAL_DIR):]).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"local-dir folder not found: {path}")
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file():
            raise ModelLoadError(f"local-dir folder {path} has no {CONFIG_FILE} (open_clip's local-dir format)")
        try:
            model_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))["model_cfg"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{cfg_path} is not a valid open_clip config with a 'model_cfg': {e}") from e
        if spec.pretrained not in (None, RANDOM):
            raise ModelLoadError(
                "a local-dir model loads the weights in its folder; set pretrained to none (or 'random'), "
                f"not {spec.pretrained!r}"
            )
        if spec.pretrained == RANDOM:
            return "random", model_cfg
        if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
            raise ModelLoadError(f"local-dir folder {path} has no weights file ({', '.join(_WEIGHT_SUFFIXES)})")
        return "local-dir", model_cfg
    name = spec.model.replace("/", "-")  # open_clip's own normalisation of names
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"unknown CLIP model {spec.model!r} (not an open_clip model name; see open_clip.list_models(), "
            f"or use local-dir:PATH).{hint}"
        )
    pretrained = spec.pretrained
    if pretrained in (None, RANDOM):
        return "random", model_cfg
    if open_clip.get_pretrained_cfg(name, pretrained):  # open_clip tries tags before files too
        return "tag", model_cfg
    if os.path.isfile(pretrained):
        return "file", model_cfg
    if os.sep in pretrained or Path(pretrained).suffix:
        raise ModelLoadError(f"checkpoint file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ModelLoadError(
        f"unknown pretrained tag {pretrained!r} for {name}; known tags: {', '.join(tags) or 'none'} "
        "(or give a checkpoint file path)"
    )


def _check_config(model_cfg: dict) -> None:
    """Reject unsupported towers from the config alone, before weights are fetched."""
    vision = model_cfg.get("vision_cfg") or {}
    if vision.get("timm_model_name"):
        check_timm_config(vision)
    if vision.get("attentional_pool") or "multimodal_cfg" in model_cfg:
        raise ModelLoadError("CLIP towers with an attentional pooler (CoCa-style) are not supported")
    if vision.get("pool_type", "tok") not in ("tok", "avg"):
        raise ModelLoadError(f"CLIP ViT pool_type {vision['pool_type']!r} is not supported (need 'tok' or 'avg')")
    custom = [opt for opt in _CUSTOM_BLOCK_OPTIONS if vision.get(opt)]
    if custom:
        raise ModelLoadError(f"CLIP ViT attention options {', '.join(custom)} are not supported")


def _create(spec: ClipSpec, source: str, device: torch.device) -> nn.Module:
    """open_clip.create_model with every failure turned into a ModelLoadError."""
    try:
        if spec.model.startswith((LOCAL_DIR, HF_HUB)):
            load_weights = source != "random"
            return open_clip.create_model(spec.model, load_weights=load_weights, device=device, weights_only=True)
        name = spec.model.replace("/", "-")
        pretrained = None if source == "random" else spec.pretrained
        # open_clip only warns when a tag was trained with QuickGELU (OpenAI's weights) but the
        # named config uses GELU; the features would then be silently off, so follow the tag.
        quick_gelu = source == "tag" and bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
        return open_clip.create_model(
            name, pretrained=pretrained, device=device, weights_only=True, force_quick_gelu=quick_gelu
        )
    except Exception as e:  # noqa: BLE001 - any failure here means "this spec does not give a model"
        offline_hint = " (no internet? download the checkpoint elsewhere and pass its file path as pretrained)"
        if source == "tag":
            what = f"could not download or load pretrained weights {spec.pretrained!r} for {spec.model!r}"
            hint = offline_hint
        elif source == "hub":
            what, hint = f"could not download or load {spec.model!r}", offline_hint
        elif source == "file":
            what, hint = f"could not load CLIP model {spec.model!r} from checkpoint {spec.pretrained!r}", ""
        else:
            what, hint = f"could not load CLIP model {spec.model!r}", ""
        raise ModelLoadError(f"{what}: {type(e).__name__}: {e}{hint}") from e


_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
_TINY_VISION = {
    # width 64 / head_width 32 = 2 heads; 32 px / patch 8 = a 4x4 grid.
    "vit": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    # layers as a list selects ModifiedResNet; layer4 has 8*32 = 256 channels, 8 heads; 64 px -> 2x2 grid.
    "resnet": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
}


def tiny_clip_config(kind: str = "vit") -> dict:
    """A tiny open_clip model config (embed_dim 32) for tests and benchmarks.

    ``kind`` is ``"vit"`` or ``"resnet"``. The text tower keeps open_clip's real
    vocabulary size and context length so the standard tokenizer works with it.
    Returns a fresh dict each call (callers may edit it).
    """
    if kind not in _TINY_VISION:
        raise ValueError(f"kind must be one of {sorted(_TINY_VISION)}, got {kind!r}")
    return {"embed_dim": 32, "vision_cfg": copy.deepcopy(_TINY_VISION[kind]), "text_cfg": dict(_TINY_TEXT)}


def save_local_dir(config: dict, path: str | os.PathLike, seed: int = 0, preprocess: dict | None = None) -> Path:
    """Build a seeded random-init open_clip model from ``config`` and save it as a
    ``local-dir:`` folder (``open_clip_config.json`` with ``model_cfg`` and
    ``preprocess_cfg``, weights in ``open_clip_model.safetensors``). Both
    ``load_dense_clip(ClipSpec("local-dir:" + path))`` and
    ``open_clip.create_model("local-dir:" + path)`` load it. Returns the folder.

    ``preprocess_cfg`` holds open_clip's defaults except ``fill_color``, which stays
    unstated (batchseg then pads with the mean colour); ``preprocess`` overrides keys.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    defaults = asdict(PreprocessCfg())
    defaults.pop("fill_color")
    defaults["size"] = config.get("vision_cfg", {}).get("image_size", defaults["size"])
    preprocess = {**defaults, **(preprocess or {})}
    write_text_atomic(path / CONFIG_FILE, json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2))
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        # load_weights=False: a weights file left from an earlier save must not be read back.
        model = open_clip.create_model(LOCAL_DIR + str(path), load_weights=False)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return path
