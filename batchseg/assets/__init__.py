"""Small models this project trained itself and ships (see the model cards beside them).

They exist so that the demo and tests show meaningful labels on a machine with no
downloads; they know only the synthetic world of ``batchseg.world``.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
TOY_CLIP_DIR = ASSETS / "toy-clip"  # open_clip local-dir format (ViT tower)
TOY_CLIP_CNN_DIR = ASSETS / "toy-clip-cnn"  # open_clip local-dir format (timm ConvNeXt tower; knows shape)
TOY_SAM_CHECKPOINT = ASSETS / "toy-sam.safetensors"  # SAM_ARCHS["tiny"] weights


def toy_models_available() -> bool:
    return (TOY_CLIP_DIR / "open_clip_config.json").exists() and TOY_SAM_CHECKPOINT.exists()
