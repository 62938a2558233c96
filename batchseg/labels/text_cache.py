"""The text classifier of a build: computed once per (model, classes, templates), kept in OUT.

Reruns and later rounds reuse ``OUT/text/<key>.safetensors`` instead of running the
text tower again; the key hashes everything that changes the embeddings.
"""
from __future__ import annotations

from pathlib import Path

import json
import torch
from safetensors.torch import save_file

from batchseg.io.files import atomic_path
from batchseg.models.clip import ClipSpec, load_dense_clip
from batchseg.models.specs import model_identity  # noqa: F401  (torch-free home; re-exported)
from batchseg.models.text import Vocabulary, build_text_classifier, classifier_key
from batchseg.models.vocabulary import classifier_file, load_classifier
from batchseg.models.vocabulary import with_background  # noqa: F401  (torch-free home; re-exported)


def text_classifier(out: Path, spec: ClipSpec, vocab: Vocabulary, templates: tuple[str, ...],
                    device: str = "cpu") -> tuple[torch.Tensor, str]:
    """Return ``(classifier (C, D) float32 unit rows, key)``, computing it only if not stored."""
    key = classifier_key(model_identity(spec), vocab, templates)
    path = classifier_file(out, key)
    if path.exists():
        return load_classifier(path), key
    import open_clip

    clip = load_dense_clip(spec, device=device)
    tokenizer = open_clip.get_tokenizer(spec.model)
    with torch.inference_mode():
        classifier = build_text_classifier(clip.model, tokenizer, vocab, templates, device=device).float().cpu()
    with atomic_path(path) as tmp:
        save_file({"classifier": classifier.contiguous()}, str(tmp), metadata={"classes": json.dumps(list(vocab.names))})
    return classifier, key
