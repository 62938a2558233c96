"""The closed sets of words batchseg writes into its tables, each defined once.

- :class:`ImageStatus`: a manifest row's ``status`` (``ok``, ``duplicate`` or why the
  file could not become an image).
- :class:`LabelKind` and :class:`LabelSource`: a label row's ``kind`` and ``source``.
- :class:`StudentKind`: what a trained student is (``config.json``'s ``kind``).

They are :class:`enum.StrEnum` classes: every member *is* its string (equal to it, same
hash, JSON and Parquet write the plain value), so files written before and after stay
byte-compatible, and rows read back from a file compare equal to members. Code uses the
members, never the literals; a value outside the set is refused where it enters
(:class:`batchseg.io.images.ImageError`, the stage configs' ``validate``). Test membership
of a plain string against ``tuple(Kind)`` or a frozenset, not the class (Python 3.11 raises
TypeError for ``"x" in Kind``). Standard library only.
"""
from __future__ import annotations

from enum import StrEnum


def values(kind: type[StrEnum]) -> tuple[str, ...]:
    """The plain strings of ``kind``'s members, in order: for ``click.Choice`` (which would
    offer an enum's member *names*) and for the pipeline-file schema."""
    return tuple(member.value for member in kind)


class ImageStatus(StrEnum):
    """A manifest row's ``status``: the file's image is in the build, or why it is not."""

    OK = "ok"  # decoded and embedded: the row owns a store row
    DUPLICATE = "duplicate"  # same bytes as an ``ok`` file: computed once, under the other row
    EMPTY = "empty"
    TRUNCATED = "truncated"
    NOT_AN_IMAGE = "not_an_image"
    TOO_LARGE = "too_large"
    UNREADABLE = "unreadable"
    DECODE_ERROR = "decode_error"
    CHANGED = "changed"  # the file's bytes changed between planning (hashing) and decoding

    @property
    def failed(self) -> bool:
        return self not in USABLE_STATUSES


#: Statuses of rows whose image is in the build (its own store row, or a copy's).
USABLE_STATUSES: frozenset[ImageStatus] = frozenset({ImageStatus.OK, ImageStatus.DUPLICATE})
#: Every way a file can fail to become an image; an ``ImageError`` carries one of these.
FAILURE_STATUSES: frozenset[ImageStatus] = frozenset(ImageStatus) - USABLE_STATUSES


class LabelKind(StrEnum):
    """A label row's ``kind``: one non-overlapping RLE per (image, class), or one per object."""

    SEMANTIC = "semantic"
    INSTANCE = "instance"


class LabelSource(StrEnum):
    """A label row's ``source``: what produced it."""

    MASKCLIP = "maskclip"  # the training-free dense head (round 0)
    SAM = "sam"  # SAM masks recognised by CLIP, and SAM's region vote on the dense labels
    STUDENT = "student"  # a self-training head (rounds >= 1) or a trained student (`predict`)


#: Which source a reader takes when not told: SAM-refined first, each round's best labels.
SOURCE_PREFERENCE: tuple[LabelSource, ...] = (LabelSource.SAM, LabelSource.STUDENT, LabelSource.MASKCLIP)
#: `train-student --source`: a label source, or ``auto`` for the first of SOURCE_PREFERENCE present.
AUTO_SOURCE = "auto"
TRAIN_SOURCES: tuple[str, ...] = (AUTO_SOURCE, *(source.value for source in SOURCE_PREFERENCE))


class StudentKind(StrEnum):
    """What `train-student --kind` trains (and a student folder's ``config.json`` says it is)."""

    SEMANTIC = "semantic"
    INSTANCE = "instance"
    SAM_ENCODER = "sam-encoder"  # a distilled SAM image encoder, written as a SAM model folder


class RunStatus(StrEnum):
    """A run record's ``status`` (``OUT/runs/RUN_ID.json``)."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C (KeyboardInterrupt): the run may simply be started again
