"""The settings of one `batchseg qc` fit, validated once at the edge."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from batchseg.choices import QC_FEATURES, QC_METHODS
from batchseg.errors import UsageError

DEFAULT_CONTAMINATION = 0.05
DEFAULT_DUP_THRESHOLD = 0.97


@dataclass(frozen=True)
class QcSettings:
    """What a fitted qc model was fitted with; a rerun with other values needs ``--refit``.

    Exactly one of ``contamination`` (the fraction of the fit sample flagged: the
    threshold is that upper quantile of the method's fit-sample scores) and
    ``threshold`` (a raw score of ``method``) is set.
    """

    method: str = "rglasso"  # the detector whose scores flag outliers
    compare: tuple[str, ...] = ()  # further detectors scored for comparison (no flags)
    contamination: float | None = DEFAULT_CONTAMINATION
    threshold: float | None = None
    dup_threshold: float = DEFAULT_DUP_THRESHOLD  # cosine similarity of near-duplicates
    features: str = "global"  # what the detectors see (batchseg.qc.features)
    dup_features: str = "global"  # what near-duplicates are compared on
    max_dim: int = 32  # the reduced dimension is at most this
    fit_sample: int = 20_000  # detectors are fitted on at most this many images (seeded sample)
    rho: float = 0.05  # rglasso: ℓ1 weight on the precision's off-diagonal entries
    seed: int = 0

    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method,) + tuple(m for m in self.compare if m != self.method)

    def validate(self) -> None:
        for name in self.methods:
            if name not in QC_METHODS:
                raise UsageError(f"--method/--compare: unknown method {name!r}; choose from {', '.join(QC_METHODS)}")
        if self.contamination is not None and self.threshold is not None:
            raise UsageError("give at most one of --contamination and --threshold")
        if self.contamination is None and self.threshold is None:
            raise UsageError("give one of --contamination and --threshold")
        if self.contamination is not None and not 0.0 < self.contamination < 0.5:
            raise UsageError(f"--contamination must be in (0, 0.5), got {self.contamination}")
        if self.threshold is not None and self.threshold < 0:
            raise UsageError(f"--threshold must be >= 0 (scores are distances or 1 - D(x)), got {self.threshold}")
        if not -1.0 <= self.dup_threshold <= 1.0:
            raise UsageError(f"--dup-threshold must be a cosine similarity in [-1, 1], got {self.dup_threshold}")
        for option, value in (("--features", self.features), ("--dup-features", self.dup_features)):
            if value not in QC_FEATURES:
                raise UsageError(f"{option}: unknown feature {value!r}; choose from {', '.join(QC_FEATURES)}")
        if self.max_dim < 2:
            raise UsageError(f"--max-dim must be at least 2, got {self.max_dim}")
        if self.fit_sample < 20:
            raise UsageError(f"--fit-sample must be at least 20, got {self.fit_sample}")
        if self.rho < 0:
            raise UsageError(f"--rho must be >= 0, got {self.rho}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["compare"] = list(self.compare)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QcSettings":
        data = dict(data)
        data["compare"] = tuple(data.get("compare", ()))
        return cls(**data)

    def differences(self, other: "QcSettings") -> list[str]:
        """Human-readable ``name: stored -> requested`` lines where the two differ."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{key}: {mine[key]!r} -> {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]
