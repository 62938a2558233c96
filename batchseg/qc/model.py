"""The fitted qc model: reduction, detectors and thresholds, small enough to keep beside the table.

Fitted once (``fit_qc_model``), then every later run scores only new images with it
(``QcModel.score``), so the cost of an incremental rerun grows with the new images.
It turns into a JSON-able description plus named float arrays (``to_parts``), which
``batchseg.io.qc_table`` stores as ``OUT/qc/_model.json`` + a safetensors file: no
pickle, nothing executable in it.

Scores, all "higher = more outlying", of reduced coordinates z (``Reduction``):

- ``rglasso``: Mahalanobis distance under the Robust Graphical Lasso's (μ, Θ);
- ``mcd``: Mahalanobis distance under scikit-learn ``MinCovDet``'s location and precision;
- ``mogaal``: 1 − D(z) of MO-GAAL's discriminator, in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from batchseg.io.hashing import canonical_json, sha256_bytes
from batchseg.qc.reduction import Moments, Reduction, fit_reduction
from batchseg.qc.rglasso import RGLassoSettings, fit_rglasso, mahalanobis
from batchseg.qc.settings import QcSettings

if TYPE_CHECKING:  # torch: imported only when a model uses mogaal
    from batchseg.qc.mogaal import MoGaalModel

MODEL_FORMAT = 1


@dataclass
class QcModel:
    settings: QcSettings
    reduction: Reduction
    gaussians: dict[str, tuple[np.ndarray, np.ndarray]]  # rglasso/mcd: (location (k,), precision (k, k))
    mogaal: MoGaalModel | None
    thresholds: dict[str, float]  # per method: scores above are outliers
    info: dict[str, Any] = field(default_factory=dict)  # fit facts for the run record and the user
    model_id: str = ""

    def score(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of raw embeddings ``rows`` (m, D) by method: each (m,) float64."""
        z = self.reduction.project(rows)
        scores = {name: mahalanobis(z, loc, prec) for name, (loc, prec) in self.gaussians.items()}
        if self.mogaal is not None:
            scores["mogaal"] = self.mogaal.score(z)
        return scores

    def is_outlier(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(m,) bool: the flagging method's score above its threshold."""
        method = self.settings.method
        return scores[method] > self.thresholds[method]

    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {
            "reduction.mean": self.reduction.mean,
            "reduction.components": self.reduction.components,
            "reduction.centre": self.reduction.centre,
            "reduction.scale": self.reduction.scale,
        }
        for name, (location, precision) in self.gaussians.items():
            arrays[f"{name}.location"] = location
            arrays[f"{name}.precision"] = precision
        if self.mogaal is not None:
            arrays.update({f"mogaal.{k}": v for k, v in self.mogaal.arrays().items()})
        meta = {
            "format": MODEL_FORMAT,
            "model_id": self.model_id,
            "settings": self.settings.to_json(),
            "thresholds": self.thresholds,
            "explained_variance": self.reduction.explained,
            "mogaal_hidden": self.mogaal.hidden if self.mogaal is not None else None,
            "info": self.info,
        }
        return meta, {k: np.ascontiguousarray(v, dtype=np.float64 if not k.startswith("mogaal.") else np.float32)
                      for k, v in arrays.items()}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "QcModel":
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"qc model format {meta.get('format')!r}, this batchseg reads {MODEL_FORMAT}")
        settings = QcSettings.from_json(meta["settings"])
        reduction = Reduction(arrays["reduction.mean"], arrays["reduction.components"], arrays["reduction.centre"],
                              arrays["reduction.scale"], float(meta["explained_variance"]))
        gaussians = {name: (arrays[f"{name}.location"], arrays[f"{name}.precision"])
                     for name in ("rglasso", "mcd") if f"{name}.location" in arrays}
        mogaal = None
        if meta.get("mogaal_hidden") is not None:
            from batchseg.qc.mogaal import MoGaalModel

            sub = {k[len("mogaal."):]: v for k, v in arrays.items() if k.startswith("mogaal.")}
            mogaal = MoGaalModel.from_arrays(sub, reduction.dim, int(meta["mogaal_hidden"]))
        return cls(settings, reduction, gaussians, mogaal, {k: float(v) for k, v in meta["thresholds"].items()},
                   meta.get("info", {}), meta["model_id"])


def _model_id(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    parts = (part for name in sorted(arrays) for part in (name.encode(), np.ascontiguousarray(arrays[name]).tobytes()))
    return sha256_bytes(canonical_json(meta), *parts)[:16]


def fit_qc_model(moments: Moments, fit_rows: np.ndarray, settings: QcSettings) -> QcModel:
    """Fit the reduction (PCA from ``moments`` of all rows) and every method of ``settings``
    on ``fit_rows`` (n, D), then set thresholds from the fit rows' scores."""
    settings.validate()
    reduction = fit_reduction(moments, fit_rows, settings.max_dim)
    z = reduction.project(fit_rows)
    info: dict[str, Any] = {"fit_rows": int(len(fit_rows)), "all_rows": int(moments.count),
                            "input_dim": int(fit_rows.shape[1]), "reduced_dim": reduction.dim,
                            "explained_variance": round(reduction.explained, 6)}
    gaussians: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    mogaal = None
    for method in settings.methods:
        if method == "rglasso":
            result = fit_rglasso(z, RGLassoSettings(rho=settings.rho))
            gaussians["rglasso"] = (result.location, result.precision)
            info["rglasso"] = {
                "iterations": result.iterations, "admm_iterations": result.admm_iterations,
                "converged": result.converged, "criterion": result.criterion, "lam": result.lam,
                "rho": settings.rho, "objective_start": result.objective[0], "objective_end": result.objective[-1],
                "rejected_steps": result.rejected_steps,
            }
        elif method == "mcd":
            from sklearn.covariance import MinCovDet

            mcd = MinCovDet(random_state=settings.seed).fit(z)
            gaussians["mcd"] = (mcd.location_, mcd.precision_)
            info["mcd"] = {"support_size": int(mcd.support_.sum())}
        elif method == "mogaal":
            from batchseg.qc.mogaal import MoGaalSettings, fit_mogaal

            mogaal = fit_mogaal(z, MoGaalSettings(seed=settings.seed))
            info["mogaal"] = {"epochs": mogaal.epochs, "generator_epochs": mogaal.generator_epochs,
                              "final_d_loss": mogaal.history["d_loss"][-1]}
    model = QcModel(settings, reduction, gaussians, mogaal, {}, info)
    fit_scores = model.score(fit_rows)
    for method, scores in fit_scores.items():
        if method == settings.method and settings.threshold is not None:
            model.thresholds[method] = float(settings.threshold)
        else:
            contamination = settings.contamination if settings.contamination is not None else 0.05
            model.thresholds[method] = float(np.quantile(scores, 1.0 - contamination))
    meta, arrays = model.to_parts()
    model.model_id = _model_id(meta, arrays)
    return model
