import numpy as np
import pytest

from batchseg.labels.rle import encode_mask
from batchseg.report.overlay import class_colour, render_overlay


def _row(mask, class_id, name):
    rle = encode_mask(mask)
    return {"class_id": class_id, "class_name": name, "score": 0.8, "mask": rle}


def test_overlay_blends_labelled_pixels_and_adds_a_legend():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[:10] = True
    out = np.asarray(render_overlay(image, [_row(mask, 3, "red circle")], alpha=0.5))
    expected = np.round(0.5 * 100 + 0.5 * np.array(class_colour(3))).astype(np.uint8)
    np.testing.assert_array_equal(out[5, 5], expected)
    np.testing.assert_array_equal(out[15, 5], [100, 100, 100])  # unlabelled: untouched
    assert out.shape[0] > 20 and out.shape[1] >= 30  # legend below
    assert (out[20:] != 255).any()  # the legend has ink


def test_overlay_refuses_masks_of_another_size():
    with pytest.raises(ValueError, match="does not fit"):
        render_overlay(np.zeros((5, 5, 3), dtype=np.uint8), [_row(np.ones((4, 5), dtype=bool), 0, "x")])


def test_class_colours_differ():
    colours = {class_colour(i) for i in range(13)}
    assert len(colours) == 13
