"""EdgeSAM's student image encoder: a RepViT-style CNN with SAM's embedding as output.

The encoder replaces SAM's ViT (``Sam.image_encoder``): same input (the SAM-preprocessed
``(B, 3, S, S)`` canvas), same output (``(B, C, S/p, S/p)``, the image embedding the
prompt encoder and mask decoder expect). As in EdgeSAM (Zhou et al. 2023, after
RepViT, Wang et al. 2023) it is a four-stage CNN at strides 4, 8, 16 and 32 whose
blocks are MobileNet-like with the ViT's MetaFormer split::

    token mixer:   x = x + BN(depth-wise 3x3(x))          (spatial mixing, per channel)
                   [squeeze-excite on every other block]
    channel mixer: x = x + BN(1x1(GELU(BN(1x1(x)))))      (expansion 2, like the FFN)

and stage transitions of a depth-wise stride-2 convolution followed by a point-wise one.
The stride-32 features are projected to ``C`` channels, upsampled x2 and added to the
projected stride-16 features (EdgeSAM's "fuse"), then a SAM-like neck (1x1 conv, LN,
3x3 conv, LN) produces the embedding. When the teacher's grid is not ``S/16`` (another
patch size) the result is resized to it.

Sizes: ``width`` is the channel count of the stride-8 stage; the stages have
``width/2, width, 2*width, 4*width`` channels and ``2, 2, depth, 2`` blocks.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

from batchseg.students.settings import ENCODER_TYPE, MAX_DEPTH, MAX_WIDTH, SamStudentArch  # noqa: F401  (torch-free home; re-exported)

def _conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(8, channels // 4)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class _ChannelMixer(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.expand = _conv_bn(channels, 2 * channels)
        self.project = _conv_bn(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(F.gelu(self.expand(x)))


class RepViTBlock(nn.Module):
    """Depth-wise 3x3 token mixer (residual, optional SE) then a point-wise FFN (residual)."""

    def __init__(self, channels: int, squeeze_excite: bool) -> None:
        super().__init__()
        self.spatial = _conv_bn(channels, channels, 3, groups=channels)
        self.se = _SqueezeExcite(channels) if squeeze_excite else nn.Identity()
        self.mixer = _ChannelMixer(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixer(self.se(x + self.spatial(x)))


class _Downsample(nn.Module):
    """Halve the resolution (depth-wise stride 2) and change the width (point-wise), then an FFN."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.spatial = _conv_bn(c_in, c_in, 3, stride=2, groups=c_in)
        self.project = _conv_bn(c_in, c_out)
        self.mixer = _ChannelMixer(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixer(self.project(self.spatial(x)))


class RepViTSamEncoder(nn.Module):
    """A CNN with SAM's image-encoder interface.

    Attributes:
        img_size: canvas side ``S`` (what ``Sam`` and ``SamEncoder`` read).
        embed_shape: ``(C, h, w)`` of the output embedding.
    """

    def __init__(self, arch: SamStudentArch, image_size: int, out_chans: int, grid: int) -> None:
        super().__init__()
        arch.validate()
        if image_size % 32:
            raise ValueError(f"the student encoder needs a canvas that is a multiple of 32, got {image_size}")
        self.arch = arch
        self.img_size = int(image_size)
        self.embed_shape = (int(out_chans), int(grid), int(grid))
        w = arch.width
        widths = (w // 2, w, 2 * w, 4 * w)
        depths = (2, 2, arch.depth, 2)
        self.stem = nn.Sequential(_conv_bn(3, w // 4, 3, 2), nn.GELU(), _conv_bn(w // 4, widths[0], 3, 2))
        stages = []
        for index, (width, depth) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = [] if index == 0 else [_Downsample(widths[index - 1], width)]
            layers += [RepViTBlock(width, squeeze_excite=(i % 2 == 0)) for i in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.lateral16 = nn.Conv2d(widths[2], out_chans, 1)
        self.lateral32 = nn.Conv2d(widths[3], out_chans, 1)
        self.neck = nn.Sequential(
            nn.Conv2d(out_chans, out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """``(B, 3, S, S)`` float SAM-preprocessed canvas -> ``(B, C, h, w)`` embedding, same dtype."""
        x = self.stem(pixels)
        x = self.stages[0](x)
        x = self.stages[1](x)
        p16 = self.stages[2](x)
        p32 = self.stages[3](p16)
        fused = self.lateral16(p16) + F.interpolate(self.lateral32(p32), size=p16.shape[-2:], mode="bilinear",
                                                    align_corners=False)
        out = self.neck(fused)
        grid = self.embed_shape[1]
        if out.shape[-1] != grid:
            out = F.interpolate(out, size=(grid, grid), mode="bilinear", align_corners=False)
        return out


def encoder_config(arch: SamStudentArch) -> dict:
    """The ``image_encoder`` section of a SAM model folder for this student (canvas and width added there)."""
    return arch.to_json()


def build_encoder(section: dict, image_size: int, out_chans: int, grid: int) -> RepViTSamEncoder:
    """The encoder a SAM model folder's ``image_encoder`` section (type ``repvit``) describes."""
    arch = SamStudentArch(width=int(section["width"]), depth=int(section["depth"]))
    return RepViTSamEncoder(arch, image_size, out_chans, grid)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
