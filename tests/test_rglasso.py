"""Robust Graphical Lasso: support recovery vs scikit-learn on contaminated data, monotone objective."""
import numpy as np
import pytest
from sklearn.covariance import GraphicalLasso
from sklearn.metrics import roc_auc_score

from batchseg.qc.rglasso import RGLassoSettings, default_lam, fit_rglasso, graphical_lasso_admm, objective

D = 15
N = 400


def _chain_precision(d: int = D) -> np.ndarray:
    precision = np.eye(d)
    for i in range(d - 1):
        precision[i, i + 1] = precision[i + 1, i] = 0.4
    return precision


def _contaminated(seed: int, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian rows with a chain precision; the first ``fraction`` of rows shifted along one dense direction."""
    rng = np.random.default_rng(seed)
    x = rng.multivariate_normal(np.zeros(D), np.linalg.inv(_chain_precision()), N)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    outliers = int(fraction * N)
    x[:outliers] += 6.0 * direction
    is_outlier = np.zeros(N, dtype=bool)
    is_outlier[:outliers] = True
    return x, is_outlier


def _support_f1(estimate: np.ndarray, truth: np.ndarray, tol: float = 1e-4) -> float:
    off = ~np.eye(len(truth), dtype=bool)
    found, true = (np.abs(estimate) > tol) & off, (np.abs(truth) > 0) & off
    return 2 * (found & true).sum() / (found.sum() + true.sum())


@pytest.mark.parametrize("rho", [0.1, 0.2])
def test_recovers_the_support_better_than_sklearn_on_contaminated_data(rho):
    ours, theirs = [], []
    for seed in range(4):
        x, _ = _contaminated(seed)
        ours.append(_support_f1(fit_rglasso(x, RGLassoSettings(rho=rho)).precision, _chain_precision()))
        theirs.append(_support_f1(GraphicalLasso(alpha=rho, max_iter=500).fit(x).precision_, _chain_precision()))
    assert np.mean(ours) > np.mean(theirs) + 0.05, (ours, theirs)


def test_objective_decreases_monotonically_and_reports_convergence():
    x, _ = _contaminated(0)
    result = fit_rglasso(x, RGLassoSettings(rho=0.1))
    history = np.array(result.objective)
    assert len(history) == result.iterations + 1 >= 3
    assert np.all(np.diff(history) <= 1e-10 * np.abs(history[:-1]))
    assert history[-1] < history[0] - 1.0
    assert result.rejected_steps == 0  # every Θ step was a true descent, none fell back
    assert result.converged and "relative decrease" in result.criterion
    # The reported value is the objective of the returned estimate.
    assert objective(x, result.precision, result.location, result.outliers, 0.1, result.lam) == pytest.approx(history[-1])


def test_outliers_score_higher_and_are_absorbed_by_s():
    x, is_outlier = _contaminated(1)
    result = fit_rglasso(x, RGLassoSettings(rho=0.1))
    assert roc_auc_score(is_outlier, result.score(x)) > 0.8
    absorbed = np.linalg.norm(result.outliers, axis=1)
    assert absorbed[is_outlier].mean() > 2 * absorbed[~is_outlier].mean()
    assert np.all(np.linalg.eigvalsh(result.precision) > 0)


def test_admm_solves_the_graphical_lasso_like_sklearn():
    # Uncontaminated covariance: our ADMM and scikit-learn solve the same problem.
    rng = np.random.default_rng(3)
    x = rng.multivariate_normal(np.zeros(D), np.linalg.inv(_chain_precision()), N)
    cov = np.cov(x, rowvar=False, bias=True)
    ours, _, iterations = graphical_lasso_admm(cov, 0.1, RGLassoSettings(admm_tol=1e-8, admm_max_iter=5000))
    theirs = GraphicalLasso(alpha=0.1, tol=1e-6, max_iter=1000).fit(x).precision_
    assert iterations < 5000
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_default_lam_grows_with_the_dimension():
    assert 0 < default_lam(2) < default_lam(15) < default_lam(64)


@pytest.mark.parametrize("settings", [RGLassoSettings(rho=-1), RGLassoSettings(lam=0.0), RGLassoSettings(max_iter=0)])
def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError):
        fit_rglasso(np.zeros((10, 2)), settings)
