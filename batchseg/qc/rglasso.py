"""Robust Graphical Lasso: a sparse precision matrix that outlier rows cannot bend.

The data matrix is split into a clean part and sparse outliers, X = μ + F + S, and the
clean part gets a sparse inverse covariance Θ (the sample covariance of X splits the
same way, M = cov(F) + the part S brings):

    J(Θ, μ, S) = −log det Θ + tr(F̂ Θ) + ρ ‖Θ‖₁,off + (λ / n) Σᵢ ‖sᵢ‖_Θ,
    F̂ = (1/n) Σᵢ (xᵢ − μ − sᵢ)(xᵢ − μ − sᵢ)ᵀ       (the clean part's covariance),
    ‖s‖_Θ = sqrt(sᵀ Θ s)                              (an outlier's Mahalanobis length)

ρ penalises Θ's off-diagonal entries (as scikit-learn's ``GraphicalLasso``, so the two
are comparable); λ is the price of outlier length. The last term is an ℓ1 norm over
rows of the rows' lengths, so S is sparse by rows: an image is an outlier as a whole.
Two deliberate departures from the plain "M = F + S, λ‖S‖₁" statement, both needed
for a well-posed problem: the split is made on the rows the covariance is computed
from (over the covariance matrix alone the problem is unbounded below in S), and the
outlier norm is measured in Θ's metric (with an unweighted norm, S = X − μ drives F̂
to 0 and J to −∞; with it, J is bounded below and λ is scale-free: a row keeps its
first λ/2 of Mahalanobis length in the clean part, the rest goes to S; an entrywise
ℓ1 would also miss rows that are outlying as a whole but moderate in every coordinate).
Default λ: ``default_lam(d)``. Minimised by blocks, each of which does not increase J:

1. Θ ← a majorise-minimise step: ‖s‖_Θ is concave in Θ, so its tangent at the current
   Θ bounds it above; the majoriser is the graphical lasso of
   F̂ + (λ / 2n) Σᵢ sᵢ sᵢᵀ / ‖sᵢ‖_Θ, solved by ADMM (Boyd et al. 2011, §6.5: an
   eigendecomposition step, elementwise soft thresholding, a dual update),
   warm-started from the previous iterate;
2. S ← the exact minimiser for fixed (Θ, μ): sᵢ = max(0, 1 − λ / (2 ‖rᵢ‖_Θ)) rᵢ with
   rᵢ = xᵢ − μ (a group soft threshold in whitened coordinates);
3. μ ← mean(X − S), the exact minimiser for fixed (Θ, S).

So J decreases monotonically; a Θ step that would increase J (ADMM stopped short of
the majoriser's optimum) is rejected and counted in ``RGLassoResult.rejected_steps``.
Outer iterations stop when J's relative decrease
falls below ``tol`` (the convergence criterion reported with the result) or after
``max_iter``. The score of a row is its Mahalanobis distance under the robust Θ and
the robust centre μ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


# A Gaussian row keeps its whole length in the clean part with this probability. Low on
# purpose: the estimator is Huber-like, and a large λ lets a cluster of outliers inflate
# Θ⁻¹ until they look inlying (measured in tests/test_rglasso.py and bench/qc.py).
LAM_QUANTILE = 0.25


def default_lam(dim: int) -> float:
    """2 sqrt(χ²_dim(LAM_QUANTILE)): twice the length that LAM_QUANTILE of Gaussian rows stay within."""
    from scipy.stats import chi2

    return 2.0 * float(np.sqrt(chi2.ppf(LAM_QUANTILE, dim)))


@dataclass(frozen=True)
class RGLassoSettings:
    rho: float = 0.05  # ℓ1 weight on Θ's off-diagonal entries
    lam: float | None = None  # price of outlier length; None: default_lam(d)
    max_iter: int = 100  # outer (block) iterations
    tol: float = 1e-6  # stop when J's relative decrease is below this
    admm_penalty: float = 1.0  # ADMM's augmented-Lagrangian parameter
    admm_max_iter: int = 500
    admm_tol: float = 1e-6

    def validate(self) -> None:
        if self.rho < 0 or (self.lam is not None and self.lam <= 0):
            raise ValueError(f"rho must be >= 0 and lam > 0, got rho={self.rho}, lam={self.lam}")
        if min(self.max_iter, self.admm_max_iter) < 1 or self.admm_penalty <= 0 or self.tol <= 0:
            raise ValueError("iteration counts must be at least 1, admm_penalty and tol positive")


@dataclass
class RGLassoResult:
    """The fitted model. ``precision``: (d, d) float64, symmetric positive definite."""

    precision: np.ndarray
    location: np.ndarray  # (d,) float64, the robust centre μ
    outliers: np.ndarray  # (n, d) float64, S: the part of each row treated as outlier
    lam: float
    objective: list[float] = field(default_factory=list)  # J after each outer iteration (index 0: start)
    iterations: int = 0
    admm_iterations: int = 0  # summed over outer iterations
    converged: bool = False
    criterion: str = ""
    rejected_steps: int = 0

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of ``rows`` (m, d) under (μ, Θ): (m,) float64, >= 0."""
        return mahalanobis(rows, self.location, self.precision)


def mahalanobis(rows: np.ndarray, location: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """sqrt((x − μ)ᵀ Θ (x − μ)) per row: (m, d) -> (m,) float64."""
    centred = np.asarray(rows, dtype=np.float64) - location
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, precision, centred), 0.0))


def soft_threshold(values: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    return np.sign(values) * np.maximum(np.abs(values) - threshold, 0.0)


def _offdiag_l1(matrix: np.ndarray) -> float:
    return float(np.abs(matrix).sum() - np.abs(np.diag(matrix)).sum())


def objective(x: np.ndarray, precision: np.ndarray, location: np.ndarray, outliers: np.ndarray,
              rho: float, lam: float) -> float:
    """J(Θ, μ, S) as in the module docstring; +inf when Θ is not positive definite."""
    sign, logdet = np.linalg.slogdet(precision)
    if sign <= 0:
        return float("inf")
    clean = x - location - outliers
    n = x.shape[0]
    quadratic = float(np.einsum("ij,jk,ik->", clean, precision, clean)) / n
    lengths = mahalanobis(outliers, np.zeros(x.shape[1]), precision)
    return -logdet + quadratic + rho * _offdiag_l1(precision) + lam * float(lengths.sum()) / n


@dataclass
class AdmmState:
    z: np.ndarray
    u: np.ndarray


def graphical_lasso_admm(cov: np.ndarray, rho: float, settings: RGLassoSettings,
                         warm: AdmmState | None = None) -> tuple[np.ndarray, AdmmState, int]:
    """argmin_Θ −log det Θ + tr(cov Θ) + ρ‖Θ‖₁,off by ADMM; returns (Θ, state, iterations).

    ``cov``: (d, d) symmetric positive semi-definite. Stops on Boyd et al.'s primal and
    dual residual tolerances (absolute and relative ``admm_tol``). The returned Θ is the
    sparse iterate Z when it is positive definite (it is at convergence), else the
    always positive definite iterate X.
    """
    d = cov.shape[0]
    mu = settings.admm_penalty
    offdiag = rho * (1.0 - np.eye(d)) / mu
    if warm is None:
        z = np.diag(1.0 / np.maximum(np.diag(cov), 1e-12))
        u = np.zeros((d, d))
    else:
        z, u = warm.z.copy(), warm.u.copy()
    theta = z
    iterations = 0
    for iterations in range(1, settings.admm_max_iter + 1):
        eigvals, eigvecs = np.linalg.eigh(mu * (z - u) - cov)
        theta = (eigvecs * ((eigvals + np.sqrt(eigvals**2 + 4.0 * mu)) / (2.0 * mu))) @ eigvecs.T
        z_old = z
        z = soft_threshold(theta + u, offdiag)
        z = (z + z.T) / 2.0
        u = u + theta - z
        primal = np.linalg.norm(theta - z)
        dual = mu * np.linalg.norm(z - z_old)
        eps_primal = d * settings.admm_tol + settings.admm_tol * max(np.linalg.norm(theta), np.linalg.norm(z))
        eps_dual = d * settings.admm_tol + settings.admm_tol * mu * np.linalg.norm(u)
        if primal <= eps_primal and dual <= eps_dual:
            break
    estimate = z if np.linalg.eigvalsh(z)[0] > 0 else (theta + theta.T) / 2.0
    return estimate, AdmmState(z, u), iterations


def _outlier_step(residual: np.ndarray, precision: np.ndarray, lam: float) -> np.ndarray:
    """argmin_S Σᵢ (rᵢ − sᵢ)ᵀ Θ (rᵢ − sᵢ) + λ ‖sᵢ‖_Θ: each row shrunk towards 0 by λ/2."""
    lengths = mahalanobis(residual, np.zeros(residual.shape[1]), precision)
    keep = np.maximum(0.0, 1.0 - lam / (2.0 * np.maximum(lengths, 1e-300)))
    return residual * keep[:, None]


def _majoriser_cov(clean: np.ndarray, outliers: np.ndarray, precision: np.ndarray, lam: float) -> np.ndarray:
    """F̂ plus the tangent of the concave outlier term at Θ (module docstring, step 1)."""
    n, d = clean.shape
    cov = clean.T @ clean / n
    lengths = mahalanobis(outliers, np.zeros(d), precision)
    active = lengths > 0
    if active.any():
        rows = outliers[active] / np.sqrt(lengths[active])[:, None]
        cov += (lam / (2.0 * n)) * (rows.T @ rows)
    return cov + 1e-9 * np.eye(d)


def fit_rglasso(x: np.ndarray, settings: RGLassoSettings = RGLassoSettings()) -> RGLassoResult:
    """Fit the Robust Graphical Lasso to rows ``x`` (n, d) float; see the module docstring."""
    settings.validate()
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 rows, got {n}")
    lam = settings.lam if settings.lam is not None else default_lam(d)
    rho = settings.rho
    # Start from robust marginals (median, MAD): J is only biconvex, and a start from the
    # contaminated covariance would hide the outliers inside an inflated Θ⁻¹.
    location = np.median(x, axis=0)
    scale = 1.4826 * np.median(np.abs(x - location), axis=0)
    scale = np.where(scale > 1e-12, scale, max(float(x.std()), 1e-6))
    precision = np.diag(1.0 / scale**2)
    state = AdmmState(precision.copy(), np.zeros((d, d)))
    outliers = np.zeros_like(x)
    result = RGLassoResult(precision, location, outliers, lam)
    result.objective.append(objective(x, precision, location, outliers, rho, lam))
    for iteration in range(1, settings.max_iter + 1):
        outliers = _outlier_step(x - location, precision, lam)
        location = (x - outliers).mean(axis=0)
        cov = _majoriser_cov(x - location - outliers, outliers, precision, lam)
        candidate, candidate_state, admm_iterations = graphical_lasso_admm(cov, rho, settings, state)
        result.admm_iterations += admm_iterations
        before = objective(x, precision, location, outliers, rho, lam)
        after = objective(x, candidate, location, outliers, rho, lam)
        if after <= before:
            precision, state = candidate, candidate_state
        else:
            result.rejected_steps += 1
            after = before
        result.objective.append(after)
        result.iterations = iteration
        previous = result.objective[-2]
        if (previous - after) / max(abs(previous), 1.0) < settings.tol:
            result.converged = True
            break
    result.precision, result.location, result.outliers = precision, location, outliers
    result.criterion = (
        f"relative decrease of J below {settings.tol:g}" if result.converged
        else f"max_iter={settings.max_iter} reached"
    )
    return result
