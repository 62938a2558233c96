"""MO-GAAL: injected outliers score higher (score = 1 - D(x)), seeded, the stop rule, save and load."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from batchseg.qc.mogaal import MoGaalModel, MoGaalSettings, _shares, fit_mogaal

FAST = MoGaalSettings(stop_epochs=10, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    inliers = rng.normal(size=(300, 8))
    outliers = rng.normal(size=(15, 8)) * 0.5 + rng.choice([-1.0, 1.0], (15, 8)) * 4.0
    return np.r_[inliers, outliers], np.r_[np.zeros(300, dtype=bool), np.ones(15, dtype=bool)]


@pytest.fixture(scope="module")
def model(data):
    torch.set_num_threads(1)
    return fit_mogaal(data[0], FAST)


def test_injected_outliers_score_higher(data, model):
    x, is_outlier = data
    scores = model.score(x)
    assert scores.shape == (len(x),) and np.all((scores >= 0) & (scores <= 1))
    assert roc_auc_score(is_outlier, scores) > 0.8
    # The direction is the paper's: 1 - D(x). D itself (what pyod returns) ranks them the other way.
    with torch.no_grad():
        d_of_x = model.discriminator(torch.as_tensor(model.normalise(x))).squeeze(1).numpy()
    np.testing.assert_allclose(scores, 1.0 - d_of_x, atol=1e-6)
    assert roc_auc_score(is_outlier, d_of_x) < 0.2


def test_stop_rule_freezes_the_generators_after_stop_epochs(model):
    assert model.epochs == 3 * FAST.stop_epochs
    assert model.generator_epochs == FAST.stop_epochs
    g_loss = np.array(model.history["g_loss"])
    assert np.all(np.isfinite(g_loss[:FAST.stop_epochs])) and np.all(np.isnan(g_loss[FAST.stop_epochs:]))
    assert len(model.history["d_loss"]) == model.epochs


def test_seeded_and_round_trips_through_arrays(data, model):
    x, _ = data
    again = fit_mogaal(x, FAST)
    np.testing.assert_array_equal(again.score(x), model.score(x))
    loaded = MoGaalModel.from_arrays(model.arrays(), model.dim, model.hidden)
    np.testing.assert_array_equal(loaded.score(x), model.score(x))
    other_seed = fit_mogaal(x, MoGaalSettings(stop_epochs=2, batch_size=32, seed=1))
    assert not np.array_equal(other_seed.score(x), model.score(x))


@pytest.mark.parametrize("k,total", [(10, 500), (3, 7), (1, 5), (4, 3)])
def test_generator_shares_favour_the_low_targets_and_sum_to_the_batch(k, total):
    sizes = _shares(k, total)
    assert len(sizes) == k and sum(sizes) == total
    assert all(a >= b for a, b in zip(sizes[:-2], sizes[1:-1]))
