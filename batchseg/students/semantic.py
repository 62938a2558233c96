"""The semantic student (MaskCLIP+): a compact CNN whose classifier is CLIP's text embeddings.

Pixels are embedded into CLIP's joint space and scored by cosine similarity against
the frozen text embeddings of the classes, so the student stays open-vocabulary in
that space (swap the text rows to rename or add classes). Background gets a learnable
embedding: it replaces the text row of a "background" class when the vocabulary has
one (a prompt is a poor description of "everything else"), and is appended as an
extra output otherwise, trained on the pixels no label row covers; predictions of
that extra output are written as unlabelled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchseg.choices import BACKGROUND
from batchseg.students.blocks import Backbone, _norm
from batchseg.students.settings import SemanticArch  # noqa: F401  (torch-free home; re-exported)


class SemanticStudent(nn.Module):
    """``(B, 3, S, S)`` normalised pixels -> ``(B, K, S, S)`` float32 logits.

    ``K = C`` when the vocabulary has a "background" class, else ``C + 1`` (the last
    output is the learnable background, :attr:`extra_background`). The text classifier
    ``(C, D)`` unit rows is a frozen buffer, saved with the weights.
    """

    def __init__(self, arch: SemanticArch, text_classifier: Tensor, class_names: tuple[str, ...]) -> None:
        super().__init__()
        arch.validate()
        if text_classifier.ndim != 2 or text_classifier.shape[0] != len(class_names):
            raise ValueError(f"classifier {tuple(text_classifier.shape)} does not fit {len(class_names)} classes")
        self.arch = arch
        self.class_names = tuple(class_names)
        dim = text_classifier.shape[1]
        lowered = [name.strip().lower() for name in class_names]
        self.background_index = lowered.index(BACKGROUND) if BACKGROUND in lowered else None
        self.register_buffer("text", F.normalize(text_classifier.float(), dim=-1).contiguous())
        if self.background_index is not None:
            init = self.text[self.background_index].clone()
        else:
            init = -F.normalize(self.text.mean(0), dim=-1)  # away from every class to start with
        self.background = nn.Parameter(init)
        self.backbone = Backbone(arch.blocks, arch.width, arch.depth, arch.heads)
        half = arch.width // 2
        self.lateral = nn.Conv2d(half, arch.width, 1)
        self.fuse = nn.Sequential(nn.Conv2d(arch.width, arch.width, 3, padding=1), _norm(arch.width), nn.GELU())
        self.embed = nn.Conv2d(arch.width, dim, 1)

    @property
    def extra_background(self) -> bool:
        return self.background_index is None

    @property
    def num_outputs(self) -> int:
        return len(self.class_names) + int(self.extra_background)

    def classifier(self) -> Tensor:
        """``(K, D)`` unit rows: the text rows with the learnable background in place."""
        bg = F.normalize(self.background, dim=-1)[None]
        if self.background_index is None:
            return torch.cat([self.text, bg])
        i = self.background_index
        return torch.cat([self.text[:i], bg, self.text[i + 1 :]])

    def forward(self, pixels: Tensor) -> Tensor:
        f8, f4 = self.backbone(pixels)
        up = F.interpolate(f8, size=f4.shape[-2:], mode="bilinear", align_corners=False)
        features = F.normalize(self.embed(self.fuse(up + self.lateral(f4))), dim=1)  # (B, D, S/4, S/4)
        logits = torch.einsum("bdhw,kd->bkhw", features, self.classifier()) / self.arch.temperature
        return F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (the frozen text classifier is a buffer, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SemanticObjective:
    """Pixel-wise cross-entropy of a :class:`SemanticStudent` on a dataset of (pixels, targets).

    ``class_weights`` ``(K,)``: per-output loss weights (``None``: plain cross-entropy).

    ``dataset`` has ``__len__``, ``order(epoch)`` and ``sample(index, epoch) -> ((3, S, S) float32,
    (S, S) int64 with -1 = ignored)`` (see ``batchseg.students.data.SemanticDataset``).
    """

    def __init__(self, dataset, device: str | torch.device = "cpu", class_weights: Tensor | None = None) -> None:
        self.dataset = dataset
        self.device = torch.device(device)
        self.class_weights = None if class_weights is None else class_weights.float().to(self.device)

    def __len__(self) -> int:
        return len(self.dataset)

    def order(self, epoch: int):
        return self.dataset.order(epoch)

    def loss(self, model: nn.Module, indices: list[int], epoch: int) -> tuple[Tensor, int]:
        pixels, targets = zip(*(self.dataset.sample(i, epoch) for i in indices))
        logits = model(torch.stack(pixels).to(self.device))
        target = torch.stack(targets).to(self.device)
        used = int((target >= 0).sum())
        if used == 0:  # nothing to learn in this batch: a zero loss that still has a graph
            return logits.sum() * 0.0, 0
        if self.class_weights is None:
            return F.cross_entropy(logits, target, ignore_index=-1), used
        # Weighted mean over the used pixels (what F.cross_entropy(weight=...) computes too).
        return F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=-1), used


def load_semantic(config: dict, weights: dict[str, Tensor]) -> SemanticStudent:
    """Rebuild a saved semantic student from its ``config.json`` and safetensors weights (eval mode)."""
    arch = SemanticArch(**config["architecture"])
    model = SemanticStudent(arch, weights["text"], tuple(config["classes"]))
    model.load_state_dict(weights)
    return model.eval()
