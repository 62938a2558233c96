"""Vocabularies, prompt templates and the text classifier's cache key: plain text, no torch.

The parts of :mod:`batchseg.models.text` a command needs before any model runs
(parsing ``--classes`` / ``--vocab`` / ``--templates``, and the key under which the
text classifier is stored), so settings can be checked and a complete round skipped
without importing torch. :mod:`batchseg.models.text` re-exports every name here.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from batchseg.choices import BACKGROUND
from batchseg.errors import UsageError
from batchseg.io.hashing import sha256_bytes

if TYPE_CHECKING:
    import torch

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation, followed by the
# 5 "scene" templates MaskCLIP adds for dense prediction (its
# tools/maskclip_utils/prompt_engineering.py uses exactly this list of 85).
# The order matters only for reproducibility of the cache key, not for the
# classifier, which averages over templates.
MASKCLIP_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
    # MaskCLIP's scene templates.
    "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# Bump when the way the classifier is computed changes, so cached classifier
# files written by older code stop matching.
_CLASSIFIER_FORMAT = 1

_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Vocabulary:
    """The classes to label, in class-id order.

    ``names[i]`` is class ``i``'s display name (written into label rows);
    ``synonyms[i]`` are the terms whose prompts are ensembled for class ``i``,
    starting with ``names[i]`` itself.
    """

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        # Validate here, not only in the parsers, so a hand-built Vocabulary is
        # held to the same rules as a parsed one.
        if not self.names:
            raise UsageError("the vocabulary is empty: give at least one class name")
        if len(self.synonyms) != len(self.names):
            raise UsageError(
                f"vocabulary has {len(self.names)} names but {len(self.synonyms)} synonym lists"
            )
        seen: dict[str, str] = {}
        for name, terms in zip(self.names, self.synonyms):
            if not terms or terms[0] != name:
                raise UsageError(f"synonyms of class {name!r} must start with the name itself")
            for term in terms:
                if not term.strip():
                    raise UsageError(f"class {name!r} has an empty name or synonym")
                if any(unicodedata.category(ch)[0] == "C" for ch in term):
                    raise UsageError(
                        f"class name or synonym {term!r} contains a control or invisible character; "
                        "class names are written into label files and exports: use plain text"
                    )
                if len(term) > MAX_TERM_CHARS:
                    raise UsageError(f"class name or synonym {term[:40]!r}... is over {MAX_TERM_CHARS} characters")
                # CLIP's tokenizer lower-cases, so 'Cat' and 'cat' are the same prompt.
                key = term.casefold()
                if key in seen:
                    other = seen[key]
                    where = "twice in class" if other == name else f"in classes {other!r} and"
                    raise UsageError(
                        f"duplicate class name or synonym {term!r} ({where} {name!r}); "
                        "each term may appear once in the vocabulary"
                    )
                seen[key] = name

    def __len__(self) -> int:
        return len(self.names)


MAX_TERM_CHARS = 200  # CLIP's context is 77 tokens; a longer 'name' is a mistake


def _clean(term: str) -> str:
    """Strip and collapse inner whitespace: 'traffic   light ' -> 'traffic light'."""
    return _WS.sub(" ", term).strip()


def _parse_entry(entry: str, where: str) -> tuple[str, ...]:
    terms = tuple(_clean(t) for t in entry.split("|"))
    if not terms[0]:
        raise UsageError(f"empty class name at {where}: {entry.strip()!r}")
    for term in terms[1:]:
        if not term:
            raise UsageError(f"empty synonym at {where}: {entry.strip()!r}")
    return terms


def _vocab_from_entries(entries: Sequence[tuple[str, ...]], source: str) -> Vocabulary:
    if not entries:
        raise UsageError(f"the vocabulary {source} is empty: give at least one class name")
    return Vocabulary(
        names=tuple(e[0] for e in entries), synonyms=tuple(tuple(e) for e in entries)
    )


def parse_classes(text: str) -> Vocabulary:
    """Parse ``"cat,dog|puppy,traffic light"``: commas separate classes, ``|`` synonyms.

    Whitespace around terms is stripped and runs of inner whitespace collapse to
    one space. Raises ``UsageError`` for an empty vocabulary, an empty name or
    synonym (``"cat,,dog"``, ``"cat|"``), or a term given twice (case-insensitive).
    """
    if not text.strip():
        raise UsageError("the class list is empty: give at least one class name")
    entries = [_parse_entry(e, f"class #{i + 1}") for i, e in enumerate(text.split(","))]
    return _vocab_from_entries(entries, "class list")


def _read_lines(path: str | PathLike[str], what: str) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers, text after ``#`` removed."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8-sig")  # tolerate a BOM from Windows editors
    except FileNotFoundError:
        raise UsageError(f"{what} file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} file {p}: {exc}") from None
    out = []
    for number, line in enumerate(raw.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((number, line))
    return out


def load_vocab_file(path: str | PathLike[str]) -> Vocabulary:
    """Read a vocabulary file: one class per line, ``cat|kitten`` for synonyms.

    Blank lines and ``#`` comments (whole-line or trailing) are ignored. Errors
    name the file and line.
    """
    lines = _read_lines(path, "vocabulary")
    entries = [_parse_entry(line, f"{path}:{number}") for number, line in lines]
    return _vocab_from_entries(entries, f"file {path}")


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Return ``templates`` as a tuple after checking each has exactly one ``{}``."""
    if not templates:
        raise UsageError("no prompt templates given")
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise UsageError(
                f"prompt template #{i + 1} {t!r} must contain '{{}}' exactly once "
                "(where the class name goes)"
            )
    return tuple(templates)


def load_templates(path: str | PathLike[str]) -> tuple[str, ...]:
    """Read prompt templates, one per line (blank lines and ``#`` comments ignored)."""
    lines = _read_lines(path, "template")
    if not lines:
        raise UsageError(f"template file {path} has no templates")
    for number, line in lines:
        if line.count("{}") != 1:
            raise UsageError(
                f"{path}:{number}: template {line!r} must contain '{{}}' exactly once"
            )
    return tuple(line for _, line in lines)


def fill_template(template: str, term: str) -> str:
    """Put ``term`` into ``template``.

    ``str.replace`` rather than ``str.format`` so braces elsewhere in a
    user's template or class name are text, not format fields.
    """
    return template.replace("{}", term, 1)


def classifier_key(model_id: str, vocab: Vocabulary, templates: Sequence[str]) -> str:
    """Hex SHA-256 identifying a text classifier, for caching classifier files.

    ``model_id`` must identify the text tower's weights (e.g. name + pretrained
    tag, or a hash of a checkpoint); the caller decides. Canonical JSON (sorted
    keys, no whitespace, UTF-8) makes the key stable across runs and machines.
    """
    payload = {
        "format": _CLASSIFIER_FORMAT,
        "model": model_id,
        "names": list(vocab.names),
        "synonyms": [list(s) for s in vocab.synonyms],
        "templates": list(templates),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return sha256_bytes(blob.encode("utf-8"))


def classifier_file(out: Path, key: str) -> Path:
    """Where a build keeps the text classifier of ``key``: ``OUT/text/<key>.safetensors``."""
    return out / "text" / f"{key}.safetensors"


def load_classifier(path: Path) -> "torch.Tensor":
    """A stored text classifier: float32 ``(C, D)``, unit rows in the build's class order."""
    from safetensors.torch import load_file  # torch: only where a classifier is used, never to plan

    return load_file(str(path))["classifier"].float()


def with_background(vocab: Vocabulary) -> Vocabulary:
    """The vocabulary with a "background" text class appended (last class id)."""
    return Vocabulary(names=(*vocab.names, BACKGROUND), synonyms=(*vocab.synonyms, (BACKGROUND,)))
