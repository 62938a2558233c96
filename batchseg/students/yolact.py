"""The instance student: YOLACT (Bolya et al. 2019) with a Nearby-Objects head for NOH-NMS.

* Features: the shared backbone's stride-8 map ``P3``, and ``P4``/``P5`` (strides 16, 32)
  from strided convolutions on it.
* Protonet: ``k = 32`` prototypes from ``P3``, upsampled to stride 4, ReLU.
* Head (shared over levels), per anchor: ``C + 1`` class logits (0 = background), 4 box
  offsets (SSD encoding, variances 0.1/0.2), ``k`` tanh mask coefficients, and the
  Nearby-Objects head: a logit of the IoU with the second-best ground-truth object
  and 4 offsets to that object (``batchseg.students.noh_nms``).
* Masks: ``sigmoid(P C^T)`` cropped by the box.
* Loss: class cross-entropy (hard negatives 3:1) + 1.5 smooth-L1 on boxes + 6.125 mask
  BCE (summed in the box, divided by the box area) + the nearby head's BCE and smooth-L1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchseg.labels.nms import fast_nms_boxes
from batchseg.students.blocks import Backbone, _norm
from batchseg.students.noh_nms import noh_nms
from batchseg.students.settings import NMS_KINDS, YolactArch  # noqa: F401  (torch-free home; re-exported)

VARIANCES = (0.1, 0.2)
ASPECTS = (1.0, 0.5, 2.0)


def make_anchors(arch: YolactArch) -> Tensor:
    """``(A, 4)`` anchors as ``cx, cy, w, h`` in canvas pixels, level by level, row-major, aspect fastest."""
    anchors = []
    for stride in (8, 16, 32):
        n = arch.input_size // stride
        side = arch.anchor_scale * stride
        centres = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        grid = []
        for aspect in ASPECTS:
            w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
            grid.append(torch.stack([cx, cy, torch.full_like(cx, w), torch.full_like(cy, h)], dim=-1))
        anchors.append(torch.stack(grid, dim=2).reshape(-1, 4))
    return torch.cat(anchors)


def to_xyxy(cxcywh: Tensor) -> Tensor:
    return torch.cat([cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2], dim=-1)


def encode(boxes_xyxy: Tensor, anchors: Tensor) -> Tensor:
    """SSD box encoding of ``(N, 4)`` xyxy boxes against ``(N, 4)`` cxcywh anchors."""
    centre = (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2
    size = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]).clamp_min(1e-3)
    return torch.cat([(centre - anchors[:, :2]) / (VARIANCES[0] * anchors[:, 2:]),
                      torch.log(size / anchors[:, 2:]) / VARIANCES[1]], dim=1)


def decode(offsets: Tensor, anchors: Tensor) -> Tensor:
    """Inverse of :func:`encode`: ``(..., 4)`` offsets -> xyxy boxes in canvas pixels."""
    centre = anchors[..., :2] + offsets[..., :2] * VARIANCES[0] * anchors[..., 2:]
    size = anchors[..., 2:] * torch.exp((offsets[..., 2:] * VARIANCES[1]).clamp(max=8.0))
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


class Yolact(nn.Module):
    """``(B, 3, S, S)`` normalised pixels -> dict of raw outputs.

    ``classes`` (B, A, C+1) logits; ``boxes`` (B, A, 4) offsets; ``coefs`` (B, A, k) in [-1, 1];
    ``nearby`` (B, A) logits; ``nearby_boxes`` (B, A, 4) offsets; ``protos`` (B, S/4, S/4, k) >= 0.
    """

    def __init__(self, arch: YolactArch, class_names: tuple[str, ...]) -> None:
        super().__init__()
        arch.validate()
        self.arch = arch
        self.class_names = tuple(class_names)
        width, k, a = arch.width, arch.prototypes, len(ASPECTS)
        self.backbone = Backbone(arch.blocks, width, arch.depth, arch.heads)
        self.down16 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), _norm(width), nn.GELU())
        self.down32 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), _norm(width), nn.GELU())
        self.protonet = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, k, 1), nn.ReLU(),
        )
        self.tower = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.cls = nn.Conv2d(width, a * (len(class_names) + 1), 3, padding=1)
        self.box = nn.Conv2d(width, a * 4, 3, padding=1)
        self.coef = nn.Conv2d(width, a * k, 3, padding=1)
        self.near = nn.Conv2d(width, a * 5, 3, padding=1)
        with torch.no_grad():  # start predicting "background" everywhere (focal-loss style prior)
            self.cls.bias.view(a, -1)[:, 0] = math.log(99.0)
        self.register_buffer("anchors", make_anchors(arch), persistent=False)

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        p3, _ = self.backbone(pixels)
        p4 = self.down16(p3)
        p5 = self.down32(p4)
        outputs: dict[str, list[Tensor]] = {"classes": [], "boxes": [], "coefs": [], "near": []}
        c1, k = len(self.class_names) + 1, self.arch.prototypes
        for level in (p3, p4, p5):
            t = self.tower(level)
            b = t.shape[0]
            for name, conv, size in (("classes", self.cls, c1), ("boxes", self.box, 4), ("coefs", self.coef, k),
                                     ("near", self.near, 5)):
                outputs[name].append(conv(t).permute(0, 2, 3, 1).reshape(b, -1, size))
        near = torch.cat(outputs["near"], dim=1)
        return {
            "classes": torch.cat(outputs["classes"], dim=1),
            "boxes": torch.cat(outputs["boxes"], dim=1),
            "coefs": torch.tanh(torch.cat(outputs["coefs"], dim=1)),
            "nearby": near[..., 0],
            "nearby_boxes": near[..., 1:],
            "protos": self.protonet(p3).permute(0, 2, 3, 1),
        }


def crop(masks: Tensor, boxes: Tensor, scale: float) -> Tensor:
    """Zero ``(N, h, w)`` masks outside their ``(N, 4)`` xyxy boxes (canvas pixels; ``scale`` = canvas / h)."""
    n, h, w = masks.shape
    ys = (torch.arange(h, dtype=masks.dtype, device=masks.device) + 0.5) * scale
    xs = (torch.arange(w, dtype=masks.dtype, device=masks.device) + 0.5) * scale
    inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] < boxes[:, 3:4])
    inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] < boxes[:, 2:3])
    return masks * (inside_y[:, :, None] & inside_x[:, None, :]).to(masks.dtype)


@dataclass(frozen=True)
class Instances:
    """Detections of one image on the canvas: ``masks`` (N, S, S) bool, ``boxes`` (N, 4) xyxy,
    ``class_ids`` (N,) int64 (0-based), ``scores`` (N,) float32."""

    masks: Tensor
    boxes: Tensor
    class_ids: Tensor
    scores: Tensor


@torch.no_grad()
def detect(model: Yolact, outputs: dict[str, Tensor], index: int, nms: str = "fast", iou_thresh: float = 0.5,
           score_thresh: float = 0.05, top_k: int = 100, max_detections: int = 50) -> Instances:
    """Post-process image ``index`` of a batch's outputs: scores, NMS (Fast or NOH), masks."""
    anchors = model.anchors.to(outputs["classes"].device)
    probs = outputs["classes"][index].float().softmax(dim=-1)[:, 1:]
    scores, class_ids = probs.max(dim=-1)
    candidates = torch.nonzero(scores > score_thresh).flatten()
    candidates = candidates[torch.argsort(scores[candidates], descending=True, stable=True)][:top_k]
    boxes = decode(outputs["boxes"][index][candidates].float(), anchors[candidates])
    scores_c, classes_c = scores[candidates], class_ids[candidates]
    if nms == "fast":
        keep = fast_nms_boxes(boxes, scores_c, iou_thresh, class_ids=classes_c)
        kept_scores = scores_c[keep]
    elif nms == "noh":
        nearby_boxes = decode(outputs["nearby_boxes"][index][candidates].float(), anchors[candidates])
        nearby = torch.sigmoid(outputs["nearby"][index][candidates].float())
        keep, kept_scores = noh_nms(boxes, scores_c, nearby_boxes, nearby, iou_thresh, score_floor=score_thresh)
    else:
        raise ValueError(f"nms must be one of {NMS_KINDS}, got {nms!r}")
    keep, kept_scores = keep[:max_detections], kept_scores[:max_detections]
    size = model.arch.input_size
    if keep.numel() == 0:
        return Instances(torch.zeros((0, size, size), dtype=torch.bool), torch.zeros((0, 4)),
                         torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    protos = outputs["protos"][index].float()  # (h, w, k)
    coefs = outputs["coefs"][index][candidates][keep].float()
    kept_boxes = boxes[keep].clamp(0, size)
    masks = torch.sigmoid(protos @ coefs.T).permute(2, 0, 1)  # (N, h, w)
    masks = crop(masks, kept_boxes, size / protos.shape[0])
    masks = F.interpolate(masks[None], size=(size, size), mode="bilinear", align_corners=False)[0] > 0.5
    return Instances(masks, kept_boxes, classes_c[keep], kept_scores.float())


def load_yolact(config: dict, weights: dict[str, Tensor]) -> Yolact:
    model = Yolact(YolactArch(**config["architecture"]), tuple(config["classes"]))
    model.load_state_dict(weights)
    return model.eval()
