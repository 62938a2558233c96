"""Vocabulary parsing and the CLIP text classifier (prompt ensembling).

The classifier is MaskCLIP's: every class name (and each of its synonyms) is put
into every prompt template, each prompt is embedded by CLIP's text tower and
L2-normalised, the prompts of one class are averaged, and the average is
L2-normalised again. Row ``c`` of the result is the unit vector that dense CLIP
features are compared with (cosine similarity) to score class ``c``.

Nothing here downloads anything: callers pass an already-built open_clip model
and its tokenizer.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from batchseg.models.vocabulary import (  # noqa: F401  (torch-free home; re-exported)
    _CLASSIFIER_FORMAT,
    MASKCLIP_TEMPLATES,
    MAX_TERM_CHARS,
    Vocabulary,
    classifier_key,
    fill_template,
    load_templates,
    load_vocab_file,
    parse_classes,
    validate_templates,
)


@torch.no_grad()
def build_text_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    vocab: Vocabulary,
    templates: Sequence[str] = MASKCLIP_TEMPLATES,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> Tensor:
    """Zero-shot classifier by prompt ensembling.

    Args:
        model: an open_clip model with ``encode_text(tokens (B, L) int64) -> (B, D)``,
            already on ``device`` (it is not moved; its train/eval mode is restored).
        tokenizer: ``tokenizer(list_of_str) -> LongTensor (B, L)``, e.g.
            ``open_clip.get_tokenizer(name)``.
        vocab: the classes; all synonyms x all templates are ensembled per class.
        templates: strings with one ``{}`` each.
        device: where tokens go; must be the model's device.
        batch_size: prompts per ``encode_text`` call (bounds memory, not results).

    Returns:
        float32 tensor of shape ``(C, D)`` on ``device``, ``C = len(vocab)``; each
        row has unit L2 norm.
    """
    templates = validate_templates(templates)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    prompts: list[str] = []
    owner: list[int] = []  # class id of each prompt
    for c, terms in enumerate(vocab.synonyms):
        for term in terms:
            for t in templates:
                prompts.append(fill_template(t, term))
                owner.append(c)

    was_training = model.training
    model.eval()  # dropout off: the classifier must be deterministic
    try:
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size]).to(device)
            # The model may run in bf16/fp16; normalise and average in float32.
            emb = model.encode_text(tokens).float()
            chunks.append(F.normalize(emb, dim=-1))
    finally:
        model.train(was_training)
    emb = torch.cat(chunks)  # (P, D), unit rows

    # Mean of each class's unit prompt embeddings, via index_add so it is one pass.
    index = torch.tensor(owner, device=emb.device)
    sums = torch.zeros(len(vocab), emb.shape[1], device=emb.device, dtype=torch.float32)
    sums.index_add_(0, index, emb)
    counts = torch.bincount(index, minlength=len(vocab)).to(torch.float32)
    means = sums / counts[:, None]
    return F.normalize(means, dim=-1)
