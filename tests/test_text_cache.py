"""The cached text classifier is keyed by what the model is, not where it lies."""
from __future__ import annotations

import shutil

import torch

from batchseg.labels.text_cache import model_identity, text_classifier
from batchseg.models.clip import ClipSpec, save_local_dir, tiny_clip_config
from batchseg.models.text import parse_classes

TEMPLATES = ("a photo of a {}.",)


def test_retrained_model_at_the_same_path_gets_new_class_embeddings(tmp_path):
    folder = save_local_dir(tiny_clip_config("vit"), tmp_path / "clip", seed=1)
    spec = ClipSpec(f"local-dir:{folder}")
    vocab = parse_classes("cat,dog")
    first, key1 = text_classifier(tmp_path / "out", spec, vocab, TEMPLATES)
    save_local_dir(tiny_clip_config("vit"), folder, seed=2)  # retrained in place
    second, key2 = text_classifier(tmp_path / "out", spec, vocab, TEMPLATES)
    assert key1 != key2 and not torch.allclose(first, second)
    assert len(list((tmp_path / "out" / "text").glob("*.safetensors"))) == 2


def test_the_same_weights_elsewhere_share_the_cache(tmp_path):
    folder = save_local_dir(tiny_clip_config("vit"), tmp_path / "a", seed=1)
    shutil.copytree(folder, tmp_path / "b")
    assert model_identity(ClipSpec(f"local-dir:{folder}")) == model_identity(ClipSpec(f"local-dir:{tmp_path / 'b'}"))
    assert model_identity(ClipSpec(f"local-dir:{folder}")).startswith("sha256:")
    assert model_identity(ClipSpec("ViT-B-16", "openai")) != model_identity(ClipSpec("ViT-B-16", "laion2b_s34b_b88k"))
