"""YOLACT's training loss, with the Nearby-Objects head's terms for NOH-NMS.

Per image, anchors are matched to ground-truth boxes by IoU (>= 0.5 positive,
< 0.4 negative, each object's best anchor forced positive). Normalised by the number
of positives in the batch:

* class: cross-entropy over positives and the hardest negatives (3 per positive);
* box: 1.5 x smooth-L1 of the SSD-encoded offsets of positives;
* mask: 6.125 x BCE of ``sigmoid(P c)`` against the object's mask, summed inside the
  ground-truth box and divided by the box's area (prototype pixels);
* nearby: BCE of the predicted IoU with the second-best object, and smooth-L1 of the
  offsets to that object where it exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from batchseg.labels.nms import box_iou_matrix
from batchseg.students.instance_data import masks_to_boxes
from batchseg.students.yolact import Yolact, crop, encode, to_xyxy

POS_IOU, NEG_IOU = 0.5, 0.4
NEG_PER_POS = 3
BOX_ALPHA, MASK_ALPHA = 1.5, 6.125
MASKS_PER_IMAGE = 100


def match(anchors: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Anchors ``(A, 4)`` cxcywh vs objects ``(G, 4)`` xyxy.

    Returns ``(state (A,) 1 positive / 0 negative / -1 neutral, best object (A,),
    second-best object (A,), IoU with the second-best (A,))``.
    """
    a = anchors.shape[0]
    if boxes.shape[0] == 0:
        zeros = torch.zeros(a, dtype=torch.int64)
        return zeros, zeros, zeros, torch.zeros(a)
    iou = box_iou_matrix(to_xyxy(anchors), boxes)  # (A, G)
    best_iou, best = iou.max(dim=1)
    forced = iou.argmax(dim=0)  # each object's best anchor
    best_iou[forced] = 2.0
    best[forced] = torch.arange(boxes.shape[0])
    state = torch.full((a,), -1, dtype=torch.int64)
    state[best_iou < NEG_IOU] = 0
    state[best_iou >= POS_IOU] = 1
    if boxes.shape[0] > 1:
        masked = iou.scatter(1, best[:, None], -1.0)
        second_iou, second = masked.max(dim=1)
        second_iou = second_iou.clamp_min(0)
    else:
        second, second_iou = torch.zeros(a, dtype=torch.int64), torch.zeros(a)
    return state, best, second, second_iou


def yolact_loss(model: Yolact, outputs: dict[str, Tensor], masks: list[Tensor], classes: list[Tensor]) -> tuple[Tensor, int]:
    """Total loss of a batch (scalar) and its number of ground-truth objects."""
    anchors = model.anchors
    device = outputs["classes"].device
    protos = outputs["protos"]  # (B, h, w, k)
    ph = protos.shape[1]
    scale = model.arch.input_size / ph
    cls_loss, box_loss, mask_loss, near_loss = (torch.zeros((), device=device) for _ in range(4))
    positives, objects = 0, 0
    for i, (gt_masks, gt_classes) in enumerate(zip(masks, classes)):
        boxes = masks_to_boxes(gt_masks)
        objects += boxes.shape[0]
        state, best, second, second_iou = match(anchors.cpu(), boxes)
        state, best, second, second_iou = (t.to(device) for t in (state, best, second, second_iou))
        boxes, gt_classes, gt_masks = boxes.to(device), gt_classes.to(device), gt_masks.to(device)
        pos = torch.nonzero(state == 1).flatten()
        n_pos = pos.numel()
        positives += n_pos
        target = torch.zeros(anchors.shape[0], dtype=torch.int64, device=device)
        if n_pos:
            target[pos] = gt_classes[best[pos]] + 1
        per_anchor = F.cross_entropy(outputs["classes"][i], target, reduction="none")
        neg_losses = torch.where(state == 0, per_anchor.detach(), torch.full_like(per_anchor, -1.0))
        n_neg = min(int((state == 0).sum()), max(NEG_PER_POS * n_pos, 8))
        hard = torch.topk(neg_losses, n_neg).indices
        cls_loss = cls_loss + per_anchor[pos].sum() + per_anchor[hard].sum()
        if not n_pos:
            continue
        box_loss = box_loss + F.smooth_l1_loss(outputs["boxes"][i][pos], encode(boxes[best[pos]], anchors[pos]),
                                               reduction="sum")
        chosen = pos[:MASKS_PER_IMAGE]
        logits = protos[i] @ outputs["coefs"][i][chosen].T  # (h, w, P)
        small = F.interpolate(gt_masks[None].float(), size=(ph, ph), mode="bilinear", align_corners=False)[0]
        target_masks = small[best[chosen]].permute(1, 2, 0).clamp(0, 1)  # (h, w, P)
        bce = F.binary_cross_entropy_with_logits(logits, target_masks, reduction="none").permute(2, 0, 1)
        gt_boxes = boxes[best[chosen]]
        cropped = crop(bce, gt_boxes, scale)
        area = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]) / scale**2).clamp_min(1.0)
        mask_loss = mask_loss + (cropped.flatten(1).sum(1) / area).sum() * n_pos / chosen.numel()
        near_loss = near_loss + F.binary_cross_entropy_with_logits(outputs["nearby"][i][pos], second_iou[pos],
                                                                   reduction="sum")
        has_second = pos[second_iou[pos] > 0]
        if has_second.numel():
            near_loss = near_loss + F.smooth_l1_loss(outputs["nearby_boxes"][i][has_second],
                                                     encode(boxes[second[has_second]], anchors[has_second]),
                                                     reduction="sum")
    norm = max(1, positives)
    total = (cls_loss + BOX_ALPHA * box_loss + MASK_ALPHA * mask_loss + near_loss) / norm
    return total, objects


class InstanceObjective:
    """The training loop's objective for :class:`Yolact` on an ``InstanceDataset``."""

    def __init__(self, dataset, device: str | torch.device = "cpu") -> None:
        self.dataset = dataset
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.dataset)

    def order(self, epoch: int):
        return self.dataset.order(epoch)

    def loss(self, model: Yolact, indices: list[int], epoch: int) -> tuple[Tensor, int]:
        pixels, masks, classes = zip(*(self.dataset.sample(i, epoch) for i in indices))
        outputs = model(torch.stack(pixels).to(self.device))
        return yolact_loss(model, outputs, list(masks), list(classes))
