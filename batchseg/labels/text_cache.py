"""The text classifier of a build: computed once per (model, classes, templates), kept in OUT.

Reruns and later rounds reuse ``OUT/text/<key>.safetensors`` instead of running the
text tower again; the key hashes everything that changes the embeddings.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import json
import torch
from safetensors.torch import load_file, save_file

from batchseg.choices import BACKGROUND
from batchseg.io.hashing import file_sha256
from batchseg.models.clip import LOCAL_DIR, ClipSpec, load_dense_clip
from batchseg.models.text import Vocabulary, build_text_classifier, classifier_key


def with_background(vocab: Vocabulary) -> Vocabulary:
    """The vocabulary with a "background" text class appended (last class id)."""
    return Vocabulary(names=(*vocab.names, BACKGROUND), synonyms=(*vocab.synonyms, (BACKGROUND,)))


def model_identity(spec: ClipSpec) -> str:
    """What the CLIP *is*, not how its path was spelt: for a ``local-dir:`` folder or a
    checkpoint file, the SHA-256 of its config and weight files (so a model retrained in
    place gets a new key and never reuses stale class embeddings); for a named model with
    a pretrained tag, the name and tag (the tag names fixed weights)."""
    files: list[Path] = []
    if spec.model.startswith(LOCAL_DIR):
        folder = Path(spec.model[len(LOCAL_DIR):]).expanduser()
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    elif spec.pretrained and Path(spec.pretrained).expanduser().is_file():
        files = [Path(spec.pretrained).expanduser()]
    if not files:
        return json.dumps(asdict(spec), sort_keys=True)
    # A named architecture with a checkpoint file: the name matters; a folder: only its files.
    digest = hashlib.sha256(b"" if spec.model.startswith(LOCAL_DIR) else spec.model.encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return f"sha256:{digest.hexdigest()}"


def text_classifier(out: Path, spec: ClipSpec, vocab: Vocabulary, templates: tuple[str, ...],
                    device: str = "cpu") -> tuple[torch.Tensor, str]:
    """Return ``(classifier (C, D) float32 unit rows, key)``, computing it only if not stored."""
    key = classifier_key(model_identity(spec), vocab, templates)
    path = out / "text" / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))["classifier"], key
    import open_clip

    clip = load_dense_clip(spec, device=device)
    tokenizer = open_clip.get_tokenizer(spec.model)
    with torch.inference_mode():
        classifier = build_text_classifier(clip.model, tokenizer, vocab, templates, device=device).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"classifier": classifier.contiguous()}, str(tmp), metadata={"classes": json.dumps(list(vocab.names))})
    os.replace(tmp, path)
    return classifier, key
