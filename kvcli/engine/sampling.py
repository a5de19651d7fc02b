"""Choosing the next token from logits: greedy by default, temperature sampling with a seed,
optionally from the smallest set of tokens whose probability reaches ``top_p`` (nucleus)."""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, *, temperature: float = 0.0, seed: int = 0, top_p: float = 1.0):
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p)
            # the most probable tokens until their mass reaches top_p (at least one)
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            return int(keep[self.rng.choice(len(keep), p=p[keep] / p[keep].sum())])
        return int(self.rng.choice(len(p), p=p))
