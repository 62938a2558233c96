"""MO-GAAL (Liu et al. 2019, "Generative Adversarial Active Learning for Unsupervised
Outlier Detection") in torch.

k sub-generators create reference outliers for one discriminator D that learns to
tell real rows (label 1) from generated ones (label 0). Sub-generator i (i = 0..k-1)
is trained so that D of its samples matches T_i, the i/k quantile of D over the real
data: the generators spread their samples over regions of different density, from
the emptiest (T_0, D's minimum) up, and contribute (k − i) shares of each generated
batch, as in the authors' code. The paper's stop rule: the generators train for
``stop_epochs`` epochs, after which they are frozen and D alone trains on their
output until ``3 * stop_epochs``.

Architecture and optimisers as the authors' code (and pyod's port of it): each
generator two ``latent → latent`` layers initialised to the identity, fed uniform
[0, 1) noise of the data's dimension (``latent = d``); D one hidden layer of
``ceil(sqrt(n))`` ReLU units and a sigmoid output; SGD with momentum 0.9, learning
rate 0.01 for D and 0.0001 for the generators. Rows are min-max scaled to [0, 1] per
coordinate (over the training rows; the scale is part of the model) as in the paper's
experiments: the generators start as the identity on uniform noise, i.e. as uniform
samples of the data's bounding box, so D starts out as a density-ratio classifier of
data against background.

The outlier score is ``1 − D(x)`` in [0, 1], higher = more outlying, as the paper
defines it. (pyod's ``MO_GAAL`` returns D(x) itself, an inverted score: its issues
#119 and #237.) Everything is seeded: the same data and seed give the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class MoGaalSettings:
    k: int = 10  # sub-generators
    stop_epochs: int = 20  # generators train this long; D trains until 3x this
    batch_size: int = 500
    lr_d: float = 0.01
    lr_g: float = 0.0001
    momentum: float = 0.9
    seed: int = 0

    def validate(self) -> None:
        if min(self.k, self.stop_epochs, self.batch_size) < 1:
            raise ValueError("k, stop_epochs and batch_size must be at least 1")
        if self.lr_d <= 0 or self.lr_g <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("learning rates must be positive and momentum in [0, 1)")


def _discriminator(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())


def _generator(dim: int) -> nn.Sequential:
    first, second = nn.Linear(dim, dim), nn.Linear(dim, dim)
    for layer in (first, second):
        nn.init.eye_(layer.weight)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(first, nn.ReLU(), second, nn.ReLU())


@dataclass
class MoGaalModel:
    """A trained discriminator; ``score`` gives 1 − D(x)."""

    discriminator: nn.Sequential
    dim: int
    hidden: int
    low: np.ndarray  # (dim,) float32: per-coordinate minimum of the training rows
    span: np.ndarray  # (dim,) float32: max − min (1 where constant)
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch: d_loss, g_loss
    generator_epochs: int = 0  # epochs the generators trained (the stop rule's cut)
    epochs: int = 0

    @torch.no_grad()
    def score(self, rows: np.ndarray, batch: int = 65536) -> np.ndarray:
        """1 − D(x) for ``rows`` (m, dim): (m,) float64 in [0, 1], higher = more outlying."""
        self.discriminator.eval()
        out = np.empty(len(rows), dtype=np.float64)
        for start in range(0, len(rows), batch):
            chunk = torch.as_tensor(self.normalise(rows[start:start + batch]))
            out[start:start + len(chunk)] = 1.0 - self.discriminator(chunk).squeeze(1).double().numpy()
        return out

    def normalise(self, rows: np.ndarray) -> np.ndarray:
        return ((np.asarray(rows, dtype=np.float32) - self.low) / self.span).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        """Weights and scale as named float32 arrays (for safetensors)."""
        arrays = {f"d.{name}": t.detach().cpu().numpy().copy() for name, t in self.discriminator.state_dict().items()}
        return {**arrays, "low": self.low.copy(), "span": self.span.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], dim: int, hidden: int) -> "MoGaalModel":
        discriminator = _discriminator(dim, hidden)
        state = {name[2:]: torch.from_numpy(np.asarray(v)) for name, v in arrays.items() if name.startswith("d.")}
        discriminator.load_state_dict(state)
        return cls(discriminator, dim, hidden, np.asarray(arrays["low"]), np.asarray(arrays["span"]))


def _shares(k: int, total: int) -> list[int]:
    """Generated rows per sub-generator: (k − i) shares of ``total``, the rest to the last."""
    block = k * (k + 1) // 2
    unit = total // block
    sizes = [(k - i) * unit for i in range(k)]
    sizes[-1] += total - sum(sizes)
    return sizes


def fit_mogaal(x: np.ndarray, settings: MoGaalSettings = MoGaalSettings()) -> MoGaalModel:
    """Train MO-GAAL on rows ``x`` (n, d) float (standardised coordinates work best)."""
    settings.validate()
    rows = np.asarray(x, dtype=np.float32)
    n, dim = rows.shape
    if n < 2:
        raise ValueError(f"need at least 2 rows, got {n}")
    low = rows.min(axis=0)
    span = rows.max(axis=0) - low
    span = np.where(span > 0, span, 1.0).astype(np.float32)
    generator_rng = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        hidden = math.ceil(math.sqrt(n))
        discriminator = _discriminator(dim, hidden)
        generators = [_generator(dim) for _ in range(settings.k)]
    d_opt = torch.optim.SGD(discriminator.parameters(), lr=settings.lr_d, momentum=settings.momentum)
    g_opts = [torch.optim.SGD(g.parameters(), lr=settings.lr_g, momentum=settings.momentum) for g in generators]
    bce = nn.BCELoss()
    batch_size = min(settings.batch_size, n)
    batches = math.ceil(n / batch_size)
    quantiles = torch.arange(settings.k, dtype=torch.float32) / settings.k
    model = MoGaalModel(discriminator, dim, hidden, low, span, history={"d_loss": [], "g_loss": []})
    data = torch.as_tensor(model.normalise(rows))
    for epoch in range(3 * settings.stop_epochs):
        train_generators = epoch < settings.stop_epochs
        order = torch.randperm(n, generator=generator_rng)
        d_total = g_total = 0.0
        for index in range(batches):
            real = data[order[index * batch_size:(index + 1) * batch_size]]
            sizes = _shares(settings.k, len(real))
            noise = [torch.rand(size, dim, generator=generator_rng) for size in sizes]
            with torch.no_grad():
                fake = torch.cat([g(z) for g, z in zip(generators, noise)])
            inputs = torch.cat([real, fake])
            labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).unsqueeze(1)
            d_opt.zero_grad()
            d_loss = bce(discriminator(inputs), labels)
            d_loss.backward()
            d_opt.step()
            d_total += d_loss.item()
            if not train_generators:
                continue
            with torch.no_grad():
                targets = torch.quantile(discriminator(data).squeeze(1), quantiles)
            for g, opt, z, target in zip(generators, g_opts, noise, targets):
                if len(z) == 0:
                    continue
                for p in discriminator.parameters():
                    p.requires_grad_(False)
                opt.zero_grad()
                g_loss = bce(discriminator(g(z)), torch.full((len(z), 1), float(target)))
                g_loss.backward()
                opt.step()
                for p in discriminator.parameters():
                    p.requires_grad_(True)
                g_total += g_loss.item() / settings.k
        model.history["d_loss"].append(d_total / batches)
        model.history["g_loss"].append(g_total / batches if train_generators else float("nan"))
        model.epochs = epoch + 1
        model.generator_epochs = min(epoch + 1, settings.stop_epochs)
    return model
