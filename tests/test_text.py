"""Vocabulary parsing, templates, the prompt-ensembled text classifier and its cache key."""
from __future__ import annotations

import functools

import open_clip
import pytest
import torch

from batchseg.errors import UsageError
from batchseg.models.text import (
    MASKCLIP_TEMPLATES,
    Vocabulary,
    build_text_classifier,
    classifier_key,
    load_templates,
    load_vocab_file,
    parse_classes,
)

CONTEXT = 16


@pytest.fixture(scope="module")
def tiny_clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    # open_clip's BPE tokenizer (vocabulary ships with the package), truncated to
    # the tiny model's context length.
    return functools.partial(open_clip.tokenize, context_length=CONTEXT)


# ---------------------------------------------------------------- templates


def test_maskclip_templates_are_85_with_one_slot_each():
    assert len(MASKCLIP_TEMPLATES) == 85
    assert len(set(MASKCLIP_TEMPLATES)) == 85
    assert all(t.count("{}") == 1 for t in MASKCLIP_TEMPLATES)
    # 80 CLIP ImageNet templates, then MaskCLIP's 5 scene templates.
    assert MASKCLIP_TEMPLATES[0] == "a bad photo of a {}."
    assert MASKCLIP_TEMPLATES[79] == "a tattoo of the {}."
    assert MASKCLIP_TEMPLATES[80:] == (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )


def test_load_templates(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("# mine\n\na photo of a {}.\n  a {} in the wild.  \n")
    assert load_templates(p) == ("a photo of a {}.", "a {} in the wild.")


@pytest.mark.parametrize("text", ["no slot here\n", "two {} slots {}\n", "# only comments\n\n"])
def test_load_templates_rejects_bad_files(tmp_path, text):
    p = tmp_path / "t.txt"
    p.write_text(text)
    with pytest.raises(UsageError):
        load_templates(p)


def test_load_templates_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_templates(tmp_path / "nope.txt")


# ---------------------------------------------------------------- vocabulary

PARSE_OK = [
    ("cat", ("cat",), (("cat",),)),
    ("cat,dog", ("cat", "dog"), (("cat",), ("dog",))),
    (" cat ,  dog  ", ("cat", "dog"), (("cat",), ("dog",))),
    ("traffic   light,sky", ("traffic light", "sky"), (("traffic light",), ("sky",))),
    ("cat,dog|puppy", ("cat", "dog"), (("cat",), ("dog", "puppy"))),
    ("dog | puppy | hound ,cat", ("dog", "cat"), (("dog", "puppy", "hound"), ("cat",))),
]


@pytest.mark.parametrize("text,names,synonyms", PARSE_OK)
def test_parse_classes(text, names, synonyms):
    v = parse_classes(text)
    assert v.names == names
    assert v.synonyms == synonyms
    assert len(v) == len(names)


PARSE_BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("cat,,dog", "empty class name"),
    ("cat,dog,", "empty class name"),
    ("|kitten", "empty class name"),
    ("cat|", "empty synonym"),
    ("cat||kitten", "empty synonym"),
    ("cat,dog,cat", "duplicate"),
    ("cat,Cat", "duplicate"),
    ("cat|kitten,kitten", "duplicate"),
    ("cat|cat", "duplicate"),
]


@pytest.mark.parametrize("text,message", PARSE_BAD)
def test_parse_classes_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_classes(text)


def test_load_vocab_file(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text(
        "\ufeff# animals\n"
        "cat | kitten\n"
        "\n"
        "   \n"
        "dog  # a trailing comment\n"
        "traffic  light\n"
    )
    v = load_vocab_file(p)
    assert v.names == ("cat", "dog", "traffic light")
    assert v.synonyms == (("cat", "kitten"), ("dog",), ("traffic light",))


@pytest.mark.parametrize(
    "text,message",
    [
        ("# nothing\n\n", "empty"),
        ("cat\ncat\n", "duplicate"),
        ("cat\n|kitten\n", r"vocab.txt:2"),
        ("cat|\n", "empty synonym"),
    ],
)
def test_load_vocab_file_errors(tmp_path, text, message):
    p = tmp_path / "vocab.txt"
    p.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_vocab_file(p)


def test_load_vocab_file_missing(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_vocab_file(tmp_path / "missing.txt")


def test_vocabulary_validates_when_built_by_hand():
    with pytest.raises(UsageError):
        Vocabulary(names=(), synonyms=())
    with pytest.raises(UsageError):
        Vocabulary(names=("cat",), synonyms=(("kitten", "cat"),))
    with pytest.raises(UsageError):
        Vocabulary(names=("cat", "dog"), synonyms=(("cat",),))


# ---------------------------------------------------------------- classifier


def reference_classifier(model, tokenizer, vocab, templates):
    """MaskCLIP's zeroshot_classifier written out: per class, per prompt, plainly."""
    rows = []
    with torch.no_grad():
        for terms in vocab.synonyms:
            texts = [t.format(term) for term in terms for t in templates]
            emb = model.encode_text(tokenizer(texts))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_classifier_matches_reference_loop(tiny_clip, tokenizer):
    vocab = parse_classes("cat|kitten,dog|puppy|hound,traffic light")
    got = build_text_classifier(tiny_clip, tokenizer, vocab, MASKCLIP_TEMPLATES, batch_size=37)
    want = reference_classifier(tiny_clip, tokenizer, vocab, MASKCLIP_TEMPLATES)
    assert got.shape == (3, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_classifier_independent_of_batch_size_and_restores_mode(tiny_clip, tokenizer):
    vocab = parse_classes("cat,dog")
    templates = MASKCLIP_TEMPLATES[:5]
    tiny_clip.train()
    try:
        a = build_text_classifier(tiny_clip, tokenizer, vocab, templates, batch_size=1)
        assert tiny_clip.training  # mode restored
    finally:
        tiny_clip.eval()
    b = build_text_classifier(tiny_clip, tokenizer, vocab, templates, batch_size=1000)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_classifier_with_simple_tokenizer_object(tiny_clip):
    tok = open_clip.SimpleTokenizer(context_length=CONTEXT)
    vocab = parse_classes("cat,dog")
    got = build_text_classifier(tiny_clip, tok, vocab, ("a photo of a {}.",))
    want = reference_classifier(tiny_clip, tok, vocab, ("a photo of a {}.",))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_classifier_braces_in_name_are_text(tiny_clip, tokenizer):
    # str.format would fail on a name containing '{0}'; we substitute literally.
    vocab = parse_classes("{0} thing")
    out = build_text_classifier(tiny_clip, tokenizer, vocab, ("a {}.",))
    assert torch.isfinite(out).all()


def test_classifier_rejects_bad_templates(tiny_clip, tokenizer):
    with pytest.raises(UsageError):
        build_text_classifier(tiny_clip, tokenizer, parse_classes("cat"), ("no slot",))


# ---------------------------------------------------------------- cache key


def test_classifier_key_is_stable_and_sensitive():
    vocab = parse_classes("cat|kitten,dog")
    templates = MASKCLIP_TEMPLATES
    base = classifier_key("ViT-B-16/openai", vocab, templates)
    assert len(base) == 64 and int(base, 16) >= 0
    assert base == classifier_key("ViT-B-16/openai", parse_classes("cat | kitten, dog"), list(templates))
    variants = [
        classifier_key("ViT-B-16/laion2b", vocab, templates),
        classifier_key("ViT-B-16/openai", parse_classes("cat,dog"), templates),
        classifier_key("ViT-B-16/openai", parse_classes("dog,cat|kitten"), templates),
        classifier_key("ViT-B-16/openai", parse_classes("cat|kitten,dog|puppy"), templates),
        classifier_key("ViT-B-16/openai", parse_classes("cat|kitten,hound"), templates),
        classifier_key("ViT-B-16/openai", vocab, templates[:-1]),
        classifier_key("ViT-B-16/openai", vocab, tuple(reversed(templates))),
    ]
    assert len({base, *variants}) == len(variants) + 1


@pytest.mark.parametrize("text", ["cat,do\x07g", "cat,\u200bdog", "cat|ki\x1bten", "x" * 300])
def test_control_characters_and_absurd_lengths_are_refused(text):
    with pytest.raises(UsageError, match="control or invisible|over 200 characters"):
        parse_classes(text)
