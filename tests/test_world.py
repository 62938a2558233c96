"""The synthetic world: deterministic bytes and ground truth consistent with the pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from batchseg.io.geometry import letterbox
from batchseg.models.text import load_vocab_file
from batchseg.world import (
    BACKGROUND,
    CLASS_NAMES,
    COLOURS,
    IGNORE,
    SHAPES,
    caption_for,
    class_id,
    class_ids_to_semantic,
    render_sample,
    sample_batch,
    semantic_to_class_ids,
    write_world,
)

# Enough samples to hit every background kind, overlaps and 1..5 objects; ~0.1 s.
SAMPLES = [render_sample(seed, i) for seed in (0, 1) for i in range(30)]


def _all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_class_names_and_conversions() -> None:
    assert len(CLASS_NAMES) == len(SHAPES) * len(COLOURS) == len(set(CLASS_NAMES))
    for colour in COLOURS:
        for shape in SHAPES:
            assert CLASS_NAMES[class_id(colour, shape)] == f"{colour} {shape}"
    ids = np.array([[-1, 0, 5], [len(CLASS_NAMES) - 1, -2, 3]])
    sem = class_ids_to_semantic(ids)
    assert sem.dtype == np.uint8
    assert sem.tolist() == [[BACKGROUND, 1, 6], [len(CLASS_NAMES), IGNORE, 4]]
    back = semantic_to_class_ids(sem, background=-1, ignore=-2)
    assert back.dtype == np.int16 and (back == ids).all()


def test_write_world_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_world(tmp_path / "a", 3, seed=7)
    write_world(tmp_path / "b", 3, seed=7)
    files_a, files_b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert len(files_a) == 3 + 3 + 2 + 1  # images, label maps, instances + captions, classes.txt
    assert files_a == files_b
    write_world(tmp_path / "c", 3, seed=8)
    files_c = _all_files(tmp_path / "c")
    for p in a:
        name = p.name
        other = name.replace("s7_", "s8_")
        assert files_a[f"images/{name}"] != files_c[f"images/{other}"]
    # start= gives the same samples as a longer run from 0.
    write_world(tmp_path / "d", 2, seed=7, start=1, ground_truth=False)
    assert not (tmp_path / "d" / "gt").exists()
    assert (tmp_path / "d" / "images" / a[2].name).read_bytes() == a[2].read_bytes()


def test_render_is_a_function_of_seed_and_index() -> None:
    s1, s2 = render_sample(3, 4), render_sample(3, 4)
    assert s1.image.tobytes() == s2.image.tobytes() and s1.semantic.tobytes() == s2.semantic.tobytes()
    assert s1.caption == s2.caption
    assert render_sample(3, 5).image.tobytes() != s1.image.tobytes()


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"{s.seed}-{s.index}")
def test_ground_truth_consistent_with_pixels(sample) -> None:
    image, sem = sample.image, sample.semantic
    h, w = sem.shape
    assert image.shape == (h, w, 3) and image.dtype == np.uint8 and sem.dtype == np.uint8
    assert h != w and 64 <= h <= 160 and 64 <= w <= 160
    assert 1 <= len(sample.objects) <= 5
    owner = np.zeros((h, w), dtype=np.int32)
    for o in sample.objects:
        assert o.mask.shape == (h, w) and o.mask.dtype == np.bool_ and o.mask.any()
        owner += o.mask
        assert CLASS_NAMES[o.class_id] == f"{o.colour} {o.shape}"
        assert (sem[o.mask] == o.class_id + 1).all()
        # No anti-aliasing: every visible pixel has the exact colour.
        assert (image[o.mask] == COLOURS[o.colour]).all()
        rows, cols = np.nonzero(o.mask)
        x, y, bw, bh = o.bbox_xywh
        assert (x, y, x + bw - 1, y + bh - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
    assert owner.max() <= 1  # disjoint after occlusion
    assert ((owner == 1) == (sem != BACKGROUND)).all()  # union is the semantic foreground
    # The muted background never takes an object colour, so colour alone cannot fake an object.
    bg = image[sem == BACKGROUND]
    for rgb in COLOURS.values():
        assert not (bg == rgb).all(axis=1).any()
    for o in sample.objects:
        assert o.name in sample.caption


def test_objects_sometimes_overlap() -> None:
    touching = 0
    for s in SAMPLES:
        for i, a in enumerate(s.objects):
            grown = a.mask.copy()  # 4-neighbour dilation by one pixel
            grown[1:] |= a.mask[:-1]
            grown[:-1] |= a.mask[1:]
            grown[:, 1:] |= a.mask[:, :-1]
            grown[:, :-1] |= a.mask[:, 1:]
            touching += sum(bool((grown & b.mask).any()) for b in s.objects[i + 1:])
    assert touching >= 5


def test_captions() -> None:
    red_circle, blue_triangle = class_id("red", "circle"), class_id("blue", "triangle")
    assert caption_for([blue_triangle, red_circle, blue_triangle]) == "a red circle and two blue triangles"
    assert caption_for([class_id("green", "square")]) == "a green square"
    three = caption_for([class_id("yellow", "circle"), red_circle, class_id("green", "square")])
    assert three == "a red circle, a green square and a yellow circle"


def test_coco_labels_captions_and_classes(tmp_path: Path) -> None:
    paths = write_world(tmp_path, 4, seed=11)
    samples = [render_sample(11, i) for i in range(4)]
    coco = COCO(str(tmp_path / "gt" / "instances.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    captions = [json.loads(line) for line in (tmp_path / "gt" / "captions.jsonl").read_text().splitlines()]
    for path, s, cap in zip(paths, samples, captions):
        info = coco.loadImgs(s.index + 1)[0]
        assert info["file_name"] == path.name == cap["file_name"]
        assert (info["height"], info["width"]) == s.semantic.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[s.index + 1]))
        assert len(anns) == len(s.objects)
        for ann, o in zip(anns, s.objects):
            assert ann["category_id"] == o.class_id + 1 and ann["area"] == o.area
            assert (coco.annToMask(ann).astype(bool) == o.mask).all()
        assert cap["caption"] == s.caption
        assert np.array_equal(np.asarray(Image.open(path)), s.image)
        label = Image.open(tmp_path / "gt" / path.name)
        assert label.mode == "P" and np.array_equal(np.asarray(label), s.semantic)
    assert load_vocab_file(tmp_path / "classes.txt").names == CLASS_NAMES
    write_world(tmp_path / "plain", 1, seed=11, palette=False)
    label = Image.open(tmp_path / "plain" / "gt" / paths[0].name)
    assert label.mode == "L" and np.array_equal(np.asarray(label), samples[0].semantic)


def test_sample_batch_letterboxed() -> None:
    images, sem, captions = sample_batch(5, 10, 6, 64)
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    assert sem.shape == (6, 64, 64) and sem.dtype == np.uint8 and len(captions) == 6
    for i in range(6):
        s = render_sample(5, 10 + i)
        box = letterbox(*s.semantic.shape, 64)
        assert captions[i] == s.caption
        assert (sem[i, box.valid_h:] == IGNORE).all() and (sem[i, :, box.valid_w:] == IGNORE).all()
        assert (images[i, box.valid_h:] == 0).all() and (images[i, :, box.valid_w:] == 0).all()
        valid = sem[i, : box.valid_h, : box.valid_w]
        assert (valid != IGNORE).all() and set(np.unique(valid)) <= {0} | {o.class_id + 1 for o in s.objects}
        expected = Image.fromarray(s.semantic).resize((box.valid_w, box.valid_h), Image.Resampling.NEAREST)
        assert np.array_equal(valid, np.asarray(expected))
    again = sample_batch(5, 10, 6, 64)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], sem)


def test_render_argument_checks() -> None:
    s = render_sample(0, 0, min_side=32, max_side=48, max_objects=1)
    assert len(s.objects) == 1 and 32 <= min(s.image.shape[:2]) <= max(s.image.shape[:2]) <= 48
    with pytest.raises(ValueError):
        render_sample(0, 0, min_side=64, max_side=64)
    with pytest.raises(ValueError):
        render_sample(0, 0, max_objects=0)


def test_crowded_variant_draws_only_its_colours_sizes_and_more_objects() -> None:
    from batchseg.world import WORLD_VARIANTS

    options = WORLD_VARIANTS["crowded"]
    samples = [render_sample(21, i, options=options) for i in range(40)]
    assert {o.colour for s in samples for o in s.objects} == {"red", "blue"}
    assert all(96 <= min(s.image.shape[:2]) and max(s.image.shape[:2]) <= 288 for s in samples)
    default = [render_sample(21, i) for i in range(40)]
    assert sum(len(s.objects) for s in samples) > sum(len(s.objects) for s in default)


@pytest.mark.parametrize("bad", [dict(colours=("purple",)), dict(shapes=()), dict(min_side=50, max_side=40),
                                 dict(radius=(0.3, 0.1)), dict(overlap=1.5), dict(backgrounds=("marble",))])
def test_world_options_refuse_nonsense(bad) -> None:
    from batchseg.world import WorldOptions

    with pytest.raises(ValueError):
        WorldOptions(**bad)
