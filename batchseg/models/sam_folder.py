"""SAM model folders: every constructor size in a config JSON, the weights in safetensors.

A folder is how batchseg names a SAM that is not one of the registry's
(``vit_b``, ``vit_l``, ``vit_h``, ``tiny``): a user's fine-tuned SAM of other sizes, or a
distilled ``sam-encoder`` student (a CNN encoder with the teacher's prompt encoder and
mask decoder). ``embed --sam-model FOLDER`` accepts it::

    FOLDER/config.json        {"sam_model": SECTION, ...}  (other keys, e.g. a student's, are ignored)
    FOLDER/model.safetensors  the ``Sam`` state_dict: image_encoder.*, prompt_encoder.*, mask_decoder.*

``SECTION`` holds ``format`` (1), ``image_size`` (canvas ``S``), ``pixel_mean`` and
``pixel_std`` (3 values each, 0..255 scale), ``embed_dim`` (``C``) and ``embed_grid``
(``h = w``) of the image embedding, ``image_encoder`` (``{"type": "vit", embed_dim,
depth, num_heads, global_attn_indexes, patch_size, window_size, mlp_ratio}`` or
``{"type": "repvit", width, depth}``), ``prompt_encoder`` (``{mask_in_chans}``) and
``mask_decoder`` (``{transformer_depth, mlp_dim, num_heads, num_multimask_outputs,
iou_head_depth, iou_head_hidden_dim}``).

Loading is the checkpoints' safe path: sizes are range-checked first (a clear error
instead of a machine brought down by an absurd number), the model is built on the
``meta`` device, the safetensors header's names and shapes are compared with it
before any tensor is read, and the weights are then assigned strictly.
"""
from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from batchseg.errors import ModelLoadError
from batchseg.io.files import atomic_path, write_json_atomic
from batchseg.io.hashing import canonical_json, file_sha256, sha256_bytes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SECTION_KEY = "sam_model"
FOLDER_FORMAT = 1
MAX_PARAMETERS = 4_000_000_000  # ViT-H has 0.64 G: far past any SAM, low enough to refuse nonsense early

# (section path, lowest, highest) of every integer size.
_BOUNDS = {
    "image_size": (32, 8192), "embed_dim": (8, 4096), "embed_grid": (1, 1024),
    "prompt_encoder.mask_in_chans": (4, 1024),
    "mask_decoder.transformer_depth": (1, 64), "mask_decoder.mlp_dim": (1, 65536),
    "mask_decoder.num_heads": (1, 256), "mask_decoder.num_multimask_outputs": (1, 16),
    "mask_decoder.iou_head_depth": (1, 16), "mask_decoder.iou_head_hidden_dim": (1, 65536),
    "image_encoder.embed_dim": (1, 8192), "image_encoder.depth": (1, 256), "image_encoder.num_heads": (1, 256),
    "image_encoder.patch_size": (1, 1024), "image_encoder.window_size": (0, 1024),
    "image_encoder.width": (8, 2048),
}
_ENCODER_KEYS = {"vit": ("embed_dim", "depth", "num_heads", "global_attn_indexes", "patch_size", "window_size",
                         "mlp_ratio"),
                 "repvit": ("width", "depth")}


def section_for_arch(arch: Any, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...]) -> dict:
    """The folder section of a registry ``SamArch`` (ViT encoder)."""
    return {
        "format": FOLDER_FORMAT,
        "image_size": arch.image_size,
        "pixel_mean": list(pixel_mean),
        "pixel_std": list(pixel_std),
        "embed_dim": arch.prompt_embed_dim,
        "embed_grid": arch.image_size // arch.vit_patch_size,
        "image_encoder": {"type": "vit", "embed_dim": arch.encoder_embed_dim, "depth": arch.encoder_depth,
                          "num_heads": arch.encoder_num_heads,
                          "global_attn_indexes": list(arch.encoder_global_attn_indexes),
                          "patch_size": arch.vit_patch_size, "window_size": arch.window_size, "mlp_ratio": 4.0},
        "prompt_encoder": {"mask_in_chans": arch.mask_in_chans},
        "mask_decoder": {"transformer_depth": 2, "mlp_dim": arch.decoder_mlp_dim, "num_heads": arch.decoder_num_heads,
                         "num_multimask_outputs": 3, "iou_head_depth": 3,
                         "iou_head_hidden_dim": arch.iou_head_hidden_dim},
    }


def _get(section: dict, dotted: str) -> Any:
    value: Any = section
    for part in dotted.split("."):
        value = value[part]
    return value


def check_section(section: Any, where: str) -> dict:
    """Validate a folder section; return it. ``ModelLoadError`` names the first problem."""
    def fail(text: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: {text}")

    if not isinstance(section, dict):
        raise fail(f"has no {SECTION_KEY!r} object (a SAM model folder's config.json holds its sizes there)")
    if section.get("format") != FOLDER_FORMAT:
        raise fail(f"SAM model folder format {section.get('format')!r}; this batchseg reads {FOLDER_FORMAT}")
    for key in ("image_encoder", "prompt_encoder", "mask_decoder"):
        if not isinstance(section.get(key), dict):
            raise fail(f"{SECTION_KEY}.{key} is missing or not an object")
    kind = section["image_encoder"].get("type")
    if kind not in _ENCODER_KEYS:
        raise fail(f"{SECTION_KEY}.image_encoder.type must be one of {', '.join(_ENCODER_KEYS)}, got {kind!r}")
    for key, (low, high) in _BOUNDS.items():
        if key.startswith("image_encoder.") and key.split(".", 1)[1] not in _ENCODER_KEYS[kind]:
            continue
        try:
            value = _get(section, key)
        except (KeyError, TypeError):
            raise fail(f"{SECTION_KEY}.{key} is missing") from None
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise fail(f"{SECTION_KEY}.{key} must be an integer in [{low}, {high}], got {value!r}")
    for key in ("pixel_mean", "pixel_std"):
        values = section.get(key)
        if (not isinstance(values, list) or len(values) != 3
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise fail(f"{SECTION_KEY}.{key} must be a list of 3 finite numbers, got {values!r}")
    if min(section["pixel_std"]) <= 0:
        raise fail(f"{SECTION_KEY}.pixel_std must be positive, got {section['pixel_std']}")
    size, dim, grid = section["image_size"], section["embed_dim"], section["embed_grid"]
    decoder = section["mask_decoder"]
    if dim % 8 or dim % (2 * decoder["num_heads"]):
        raise fail(f"{SECTION_KEY}.embed_dim ({dim}) must be divisible by 8 and by 2 * mask_decoder.num_heads")
    if section["prompt_encoder"]["mask_in_chans"] % 4:
        raise fail(f"{SECTION_KEY}.prompt_encoder.mask_in_chans must be a multiple of 4")
    encoder = section["image_encoder"]
    if kind == "vit":
        patch, depth = encoder["patch_size"], encoder["depth"]
        if size % patch or size // patch != grid:
            raise fail(f"{SECTION_KEY}.image_size ({size}) / image_encoder.patch_size ({patch}) must equal embed_grid "
                       f"({grid}) exactly")
        if encoder["embed_dim"] % encoder["num_heads"]:
            raise fail(f"{SECTION_KEY}.image_encoder.embed_dim must be divisible by image_encoder.num_heads")
        indexes = encoder.get("global_attn_indexes")
        if not isinstance(indexes, list) or not all(isinstance(i, int) and 0 <= i < depth for i in indexes):
            raise fail(f"{SECTION_KEY}.image_encoder.global_attn_indexes must be block indexes in [0, {depth})")
        ratio = encoder.get("mlp_ratio")
        if not isinstance(ratio, (int, float)) or not 0 < ratio <= 16:
            raise fail(f"{SECTION_KEY}.image_encoder.mlp_ratio must be in (0, 16], got {ratio!r}")
        if encoder["window_size"] < 1 and len(indexes) < depth:
            raise fail(f"{SECTION_KEY}.image_encoder.window_size must be at least 1")
    elif size % 32 or encoder["width"] % 8 or encoder["depth"] > 64:
        raise fail("a repvit encoder needs image_size a multiple of 32, width a multiple of 8 and depth <= 64")
    return section


def build_from_section(section: dict) -> Sam:
    """A randomly initialised ``Sam`` with the section's sizes, eval mode (meta device when asked)."""
    size, dim, grid = section["image_size"], section["embed_dim"], section["embed_grid"]
    enc = section["image_encoder"]
    if enc["type"] == "vit":
        image_encoder: torch.nn.Module = ImageEncoderViT(
            depth=enc["depth"], embed_dim=enc["embed_dim"], img_size=size, mlp_ratio=float(enc["mlp_ratio"]),
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=enc["num_heads"],
            patch_size=enc["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(enc["global_attn_indexes"]), window_size=enc["window_size"], out_chans=dim)
    else:
        from batchseg.students.edgesam import build_encoder

        image_encoder = build_encoder(enc, size, dim, grid)
    dec = section["mask_decoder"]
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                     mask_in_chans=section["prompt_encoder"]["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=dec["num_multimask_outputs"],
            transformer=TwoWayTransformer(depth=dec["transformer_depth"], embedding_dim=dim, mlp_dim=dec["mlp_dim"],
                                          num_heads=dec["num_heads"]),
            transformer_dim=dim, iou_head_depth=dec["iou_head_depth"], iou_head_hidden_dim=dec["iou_head_hidden_dim"]),
        pixel_mean=[float(v) for v in section["pixel_mean"]],
        pixel_std=[float(v) for v in section["pixel_std"]],
    )
    return sam.eval()


def read_section(folder: Path) -> dict:
    """The validated ``sam_model`` section of ``folder/config.json``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"SAM model folder {folder} does not exist or is not a folder")
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config, weights):
        if not path.is_file():
            raise ModelLoadError(f"SAM model folder {folder} has no {path.name} (it needs {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE}); a student folder without them is unfinished")
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config} is not readable JSON: {exc}") from None
    return check_section(data.get(SECTION_KEY) if isinstance(data, dict) else None, str(config))


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelLoadError(f"cannot read {path}: not a valid .safetensors file ({str(exc)[:200]})") from None


def inspect_sam_folder(folder: Path) -> tuple[dict, Sam]:
    """Check ``folder`` without reading a weight: sizes, then the weights' names and shapes.

    Returns the section and the model built on the ``meta`` device.
    """
    folder = Path(folder).expanduser()
    section = read_section(folder)
    with torch.device("meta"):
        try:
            sam = build_from_section(section)
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise ModelLoadError(f"{folder / CONFIG_FILE}: sizes segment-anything refuses ({exc})") from None
    count = sum(p.numel() for p in sam.parameters())
    if count > MAX_PARAMETERS:
        raise ModelLoadError(f"{folder / CONFIG_FILE} describes a SAM of {count:,} parameters; refusing more than "
                             f"{MAX_PARAMETERS:,}")
    expected = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    found = _header_shapes(folder / WEIGHTS_FILE)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} (config wants {v})" for k, v in expected.items() if k in found and found[k] != v]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: " + ", ".join(items[:3]) + more)
        raise ModelLoadError(f"the weights in {folder / WEIGHTS_FILE} do not match the sizes in its {CONFIG_FILE}: "
                             + "; ".join(parts))
    return section, sam


def load_sam_folder(folder: Path, device: str | torch.device = "cpu") -> Sam:
    """Load a SAM model folder safely (see the module docstring); eval mode on ``device``."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    section, sam = inspect_sam_folder(folder)
    expected = sam.state_dict()
    state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    sam.load_state_dict(state, strict=True, assign=True)
    sam.register_buffer("pixel_mean", torch.tensor(section["pixel_mean"], dtype=torch.float32).view(-1, 1, 1),
                        persistent=False)
    sam.register_buffer("pixel_std", torch.tensor(section["pixel_std"], dtype=torch.float32).view(-1, 1, 1),
                        persistent=False)
    still_meta = [n for n, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"tensors left unmaterialised after loading {folder}: {still_meta[:5]}")
    try:
        return sam.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelLoadError(f"cannot put SAM on device {str(device)!r}: {exc}") from exc


def save_sam_folder(state: dict[str, torch.Tensor], section: dict, folder: Path,
                    extra_config: dict | None = None, write_config: bool = True) -> Path:
    """Write ``model.safetensors`` (then, unless told not to, ``config.json``) atomically into ``folder``.

    ``state`` is a ``Sam`` state_dict; ``extra_config`` adds top-level keys next to the section.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_section(section, "save_sam_folder")
    with atomic_path(folder / WEIGHTS_FILE, fsync=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(tmp),
                  metadata={"format": "batchseg-sam-model"})
    if write_config:
        write_folder_config(folder, section, extra_config)
    return folder


def write_folder_config(folder: Path, section: dict, extra_config: dict | None = None) -> Path:
    return write_json_atomic(Path(folder) / CONFIG_FILE, {**(extra_config or {}), SECTION_KEY: section})


def sam_folder_identity(folder: Path) -> str:
    """What the folder's SAM *is*: SHA-256 of its canonical section and its weights' content hash."""
    folder = Path(folder).expanduser()
    section = read_section(folder)
    return "sha256:" + sha256_bytes(canonical_json(section), b"\0", file_sha256(folder / WEIGHTS_FILE).encode())


def save_registry_sam(sam: Sam, arch: Any, folder: Path) -> Path:
    """Write a ViT ``Sam`` of ``arch``'s sizes (e.g. a loaded registry model) as a SAM model folder."""
    mean = tuple(float(v) for v in sam.pixel_mean.flatten().tolist())
    std = tuple(float(v) for v in sam.pixel_std.flatten().tolist())
    return save_sam_folder(sam.state_dict(), section_for_arch(arch, mean, std), folder)
