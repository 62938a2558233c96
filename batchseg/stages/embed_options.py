"""`embed`'s options as a user spells them, with their one set of defaults.

The command line (``batchseg embed SRC OUT --precision fp32 --shard-size 32``) and a
pipeline file (``models: {precision: fp32}``, ``embed: {shard-size: 32}``) name the same
options; both fill an :class:`EmbedOptions` and turn it into the stage's settings here,
so a default or a conversion (``--clip-pretrained`` left out means ``openai`` for a named
model, ``random`` means no weights) cannot differ between the two.

What stays with each caller is how it finds files and words its refusals: the pipeline
resolves relative model paths against its own folder, and the CLI also accepts a SAM
model folder as ``--sam-model``; both hand the values they settled on to this class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchseg.cluster import ClusterSettings
from batchseg.config import EmbedConfig
from batchseg.models.specs import LOCAL_DIR, ClipSpec, ModelSettings, SamSpec

RANDOM = "random"  # --clip-pretrained / --sam-checkpoint: random weights (speed tests only)


@dataclass(frozen=True)
class EmbedOptions:
    """Every `embed` option that sets what is computed and how (a pipeline file's ``models``
    and ``embed`` keys), under its Python name (``--sam-model`` is ``sam_model``). Values are
    as given; :meth:`models` and :meth:`config` convert them."""

    clip_model: str = "ViT-B-16"  # open_clip name, or local-dir:PATH
    clip_pretrained: str | None = None  # None: openai for a named model, the folder's weights for local-dir
    no_clip: bool = False
    canvas: int | None = ModelSettings.clip_canvas
    fine_canvas: int = ModelSettings.clip_fine_canvas  # 0: none
    sam_model: str = "vit_b"  # an arch of SAM_MODELS, or (CLI) a SAM model folder
    sam_checkpoint: str | None = None
    no_sam: bool = False
    precision: str = ModelSettings.precision
    batch_size: int = EmbedConfig.batch_size
    shard_size: int = EmbedConfig.shard_size
    # None or 0: EmbedConfig's (about 179 million); 0 has always meant the default on the command line.
    max_pixels: int | None = None

    def pretrained_tag(self) -> str | None:
        """The open_clip tag or checkpoint ``ClipSpec`` takes: ``None`` loads no tag (a
        local-dir folder's own weights, or random ones)."""
        if self.clip_pretrained is None:
            return None if self.clip_model.startswith(LOCAL_DIR) else "openai"
        return None if self.clip_pretrained == RANDOM else self.clip_pretrained

    def models(self) -> ModelSettings:
        """What the stored embeddings depend on. Not validated here: ``ModelSettings.validate``."""
        return ModelSettings(
            clip=None if self.no_clip else ClipSpec(self.clip_model, self.pretrained_tag()),
            sam=None if self.no_sam else SamSpec(self.sam_model,
                                                 None if self.sam_checkpoint == RANDOM else self.sam_checkpoint),
            clip_canvas=self.canvas,
            clip_fine_canvas=self.fine_canvas,
            precision=self.precision,
        )

    def config(self, source: Path, out: Path, cluster: ClusterSettings, **run: object) -> EmbedConfig:
        """The run's config; ``run`` holds what is not an embedding choice (``overwrite``,
        ``verify``, ``repair``, ``include``). Not validated here: the stage validates."""
        return EmbedConfig(
            source=source, out=out, models=self.models(), cluster=cluster, batch_size=self.batch_size,
            shard_size=self.shard_size,
            max_pixels=self.max_pixels or EmbedConfig.max_pixels,
            **run)  # type: ignore[arg-type]


DEFAULTS = EmbedOptions()
"""EmbedOptions: the one home of embed's option defaults and conversions."""
