"""Choosing the next token from logits: greedy by default, temperature sampling with a seed."""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, *, temperature: float = 0.0, seed: int = 0):
        self.temperature = temperature
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        return int(self.rng.choice(len(p), p=p))
