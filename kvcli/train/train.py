"""Training a bundle's predictor through the frozen base, as the paper does (apple/corenet
cross_entropy_for_kv_prediction.py): the base's cross-entropy on a continuation run over
the predicted cache, plus lambda times the L1 distance between predicted and true K, V.

Run as kvcli runs a prompt: positions 0..P-1 get the predicted cache (the first cell
and a prefix auxiliary's own layers exact), the base computes the last ``tail`` positions
itself over it (``TorchModel.forward(past=...)``), and only those positions' next tokens are
scored. The auxiliary is the frozen base prefix (its own cross-entropy is a constant) or a
frozen model of its own; only the predictor's matrices learn, starting from the closed-form
fit. Needs the optional extra ``kvcli[train]`` (PyTorch).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.errors import KvcliError
from kvcli.llama.capture import RMS_EPS
from kvcli.predict.predictor import Predictor

CHECKPOINT_FORMAT = "kvcli-train-checkpoint-1"


@dataclass(frozen=True)
class TrainSettings:
    tokens: int = 1024  # per training sequence
    tail: int = 64  # positions the base computes itself over the predicted cache, scored
    lr: float = 1e-6  # 1e-5 made the default's held-out cross-entropy worse (README)
    l1_weight: float | None = None  # None: 1 / the base's layer count (the paper's lambda)
    seed: int = 0  # decides the order of the training sequences
    clip: float = 1.0  # gradient norm clipping

    def check(self) -> None:
        if self.tokens < 32 or not 2 <= self.tail <= self.tokens // 2:
            raise KvcliError(
                f"need --tokens >= 32 and 2 <= --tail <= tokens / 2 (got --tokens "
                f"{self.tokens}, --tail {self.tail})"
            )
        if self.lr <= 0:
            raise KvcliError(f"--lr must be positive, not {self.lr}")


def trainable_reason(pred: Predictor) -> str | None:
    """Why ``pred`` cannot be trained here, or None."""
    if pred.origin or pred.raw_keys or pred.key_space != keys.KEY_SPACE_PRE_ROPE:
        return (
            f"kvcli trains its own fits (keys as llama.cpp caches them, less RoPE); this "
            f"predictor is {pred.origin or 'fed raw keys'}"
        )
    return None


def order_of_sequences(n_sequences: int, step: int, seed: int) -> int:
    """The sequence that training step ``step`` uses: every sequence once per epoch, in an
    order drawn from ``seed`` and the epoch."""
    epoch, within = divmod(step, n_sequences)
    return int(np.random.default_rng([seed, epoch]).permutation(n_sequences)[within])


class PredictorTrainer:
    """The frozen base (and auxiliary) in PyTorch, the predictor's matrices as parameters."""

    def __init__(
        self,
        base: Path,
        aux: Path | int,
        pred: Predictor,
        settings: TrainSettings,
        *,
        device: str = "cpu",
        train_aux: bool = False,
    ):
        from kvcli.models.model_info import key_norm_weights
        from kvcli.train.torch_forward import TorchModel, _torch

        torch = self.torch = _torch()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise KvcliError("--device cuda: PyTorch sees no CUDA device here")
        reason = trainable_reason(pred)
        if reason:
            raise KvcliError(reason)
        settings.check()
        self.settings, self.pred, self.device = settings, pred, device
        self.base = TorchModel(base, device)
        self.aux = self.base if isinstance(aux, int) else TorchModel(aux, device)
        self.aux_layers = aux if isinstance(aux, int) else self.aux.info.n_layer
        info = self.base.info
        self.l1_weight = settings.l1_weight if settings.l1_weight is not None else 1 / info.n_layer
        norms = key_norm_weights(info)
        self.inv_norms = (
            None
            if norms is None
            else {
                il: torch.tensor(
                    np.where(np.abs(w) > 1e-3, 1 / np.where(np.abs(w) > 1e-3, w, 1), 0),
                    dtype=torch.float32,
                    device=device,
                )
                for il, w in norms.items()
            }
        )
        self.params = {
            il: (
                torch.tensor(pred.weights[il], device=device, requires_grad=True),
                torch.tensor(pred.biases[il], device=device, requires_grad=True),
            )
            for il in pred.predicted_layers
        }
        # a factored predictor's shared bases train with the matrices that read them
        self.bases = {
            src: torch.tensor(b, device=device, requires_grad=True) for src, b in pred.bases.items()
        }
        self.aux_params = self._trainable_aux() if train_aux else {}
        self.optimizer = torch.optim.AdamW(self._all_params(), lr=settings.lr, weight_decay=0.0)
        self.step = 0

    def _trainable_aux(self) -> dict:
        """The auxiliary's layer tensors, but for the layers that are exact copies of the
        base's (the predictor copies their cache, so they must stay what the base has)."""
        import re

        if self.aux is self.base:
            raise KvcliError(
                f"--train-aux: this bundle's auxiliary is the base's own first "
                f"{self.aux_layers} layers, an exact prefix: training it would change "
                f"the base"
            )
        out = {}
        for name, tensor in self.aux.w.items():
            m = re.match(r"blk\.(\d+)\.", name)
            if m and int(m.group(1)) not in self.pred.copied_layers:
                tensor.requires_grad_(True)
                out[name] = tensor
        if not out:
            raise KvcliError("--train-aux: every layer of the auxiliary is a copy of the base's")
        return out

    def _all_params(self) -> list:
        return (
            [p for pair in self.params.values() for p in pair]
            + list(self.bases.values())
            + list(self.aux_params.values())
        )

    def _features(self, base_trace: dict, tokens) -> tuple[dict, object]:
        """Per source layer of the auxiliary: [un-roped K, V, hidden tensors] at every
        position; and, while the auxiliary trains, its logits over the tail."""
        aux_logits = None
        if self.aux is self.base:
            trace = base_trace
        elif self.aux_params:
            trace = {}
            aux_logits, _ = self.aux.forward(tokens, n_logits=self.settings.tail, trace=trace)
        else:
            trace = {}
            self.aux.forward(tokens, trace=trace, n_layers=self.aux_layers)
        k = self.aux_layers
        hidden_names = {
            keys.FEATURE_AUX_RESIDUAL: f"l_in-{k - 1}",
            keys.FEATURE_AUX_ATTN: f"kqv_out-{k - 1}",
            keys.FEATURE_AUX_OUT: f"l_in-{k}",
            keys.FEATURE_AUX_OUT_NORMED: f"l_in-{k}",
        }
        hidden = [trace[hidden_names[kind]] for kind in self.pred.hidden_kinds]
        hidden = [
            h * self.torch.rsqrt(h.pow(2).mean(dim=1, keepdim=True) + RMS_EPS)
            if kind == keys.FEATURE_AUX_OUT_NORMED
            else h
            for kind, h in zip(self.pred.hidden_kinds, hidden)
        ]
        return {
            src: self.torch.cat([trace[f"k_pre_rope-{src}"], trace[f"v-{src}"], *hidden], dim=1)
            for src in self.pred.feature_layers
        }, aux_logits

    def _predicted_past(self, features: dict, true_cache: list, n: int, exact_first: bool) -> dict:
        """Every base layer's cache of positions 0..n-1 as kvp writes it."""
        torch, info, pred = self.torch, self.base.info, self.pred
        positions = torch.arange(n, device=self.device)
        past = {il: (k[:n], v[:n]) for il, (k, v) in enumerate(true_cache) if il in pred.copied_layers}
        reduced = {src: features[src][:n] @ basis for src, basis in self.bases.items()}
        for il, (w, b) in self.params.items():
            src = pred.layer_map[il]
            y = (reduced[src] if il in pred.factored_layers else features[src][:n]) @ w + b
            kw = pred.k_widths[il]
            k = y[:, :kw].reshape(n, info.n_head_kv[il], info.head_dim_k)
            if self.inv_norms is not None:  # predict_state.rescale_to_key_norm
                inv = self.inv_norms[il]
                visible = max(int((inv != 0).sum()), 1)
                k = k / ((k * inv).pow(2).sum(-1, keepdim=True) / visible).sqrt().clamp_min(1e-6)
            k, v = self.base._rope(k, positions, il), y[:, kw:].reshape(n, info.n_head_kv[il], -1)
            if exact_first:
                k = torch.cat([true_cache[il][0][:1], k[1:]])
                v = torch.cat([true_cache[il][1][:1], v[1:]])
            past[il] = (k, v)
        return past

    def losses(self, tokens: list[int]) -> dict:
        """The step's forward: the base's logits over the tail with the predicted cache before
        it (``logits``), its cross-entropy (``ce``), the base's own over the same targets
        (``ce_base``), the K/V L1 summed over the predicted layers (``kv_l1``), and while the
        auxiliary trains its own cross-entropy over the tail (``aux_ce``, else 0)."""
        torch, s = self.torch, self.settings
        tokens_t = torch.as_tensor(tokens, device=self.device)
        n_past = len(tokens) - s.tail
        targets = tokens_t[n_past + 1 :]
        with torch.no_grad():
            trace = {}
            base_logits, true_cache = self.base.forward(tokens_t, n_logits=s.tail, trace=trace)
            ce_base = torch.nn.functional.cross_entropy(base_logits[:-1], targets)
            if not self.aux_params:
                features, _ = self._features(trace, tokens_t)
        aux_ce = torch.zeros((), device=self.device)
        if self.aux_params:
            features, aux_logits = self._features(trace, tokens_t)
            aux_ce = torch.nn.functional.cross_entropy(aux_logits[:-1], targets)
        past = self._predicted_past(features, true_cache, n_past, self.pred.exact_first_cell)
        logits, _ = self.base.forward(tokens_t[n_past:], n_logits=s.tail, past=past)
        l1 = sum(
            (past[il][0] - true_cache[il][0][:n_past]).abs().mean()
            + (past[il][1] - true_cache[il][1][:n_past]).abs().mean()
            for il in self.params
        )
        return {
            "logits": logits,
            "ce": torch.nn.functional.cross_entropy(logits[:-1], targets),
            "ce_base": ce_base,
            "kv_l1": l1,
            "aux_ce": aux_ce,
        }

    def train_step(self, tokens: list[int]) -> dict:
        """One optimizer step on one sequence; the losses are measured before the update."""
        start = time.perf_counter()
        out = self.losses(tokens)
        loss = out["ce"] + out["aux_ce"] + self.l1_weight * out["kv_l1"]
        self.optimizer.zero_grad()
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self._all_params(), self.settings.clip)
        self.optimizer.step()
        self.step += 1
        seconds = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": loss.item(),
            "ce": out["ce"].item(),
            "ce_base": out["ce_base"].item(),
            "kv_l1": out["kv_l1"].item(),
            "aux_ce": out["aux_ce"].item(),
            "seconds": seconds,
            "tokens_per_s": len(tokens) / seconds,
        }

    def predictor(self, source: str) -> Predictor:
        """The trained matrices as a predictor (numpy), its calibration source extended."""
        p = self.pred
        return dataclasses.replace(
            p,
            weights={il: w.detach().cpu().numpy().copy() for il, (w, _) in self.params.items()},
            biases={il: b.detach().cpu().numpy().copy() for il, (_, b) in self.params.items()},
            bases={src: b.detach().cpu().numpy().copy() for src, b in self.bases.items()},
            heldout_rel_error=[],  # the ridge's figures describe the closed-form fit only
            calibration_source=f"{p.calibration_source} + trained {self.step} steps x "
            f"{self.settings.tokens} tokens on {source}",
        )

    def checkpoint(self, identity: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": identity,
            "step": self.step,
            "params": {il: (w.detach().cpu(), b.detach().cpu()) for il, (w, b) in self.params.items()},
            "bases": {src: b.detach().cpu() for src, b in self.bases.items()},
            "aux_params": {name: t.detach().cpu() for name, t in self.aux_params.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def restore(self, checkpoint: dict, identity: dict) -> None:
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise KvcliError("not a kvcli training checkpoint")
        if checkpoint["identity"] != identity:
            theirs, ours = checkpoint["identity"], identity
            diff = ", ".join(
                f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}"
                for k in sorted(ours)
                if theirs.get(k) != ours.get(k)
            )
            raise KvcliError(f"the checkpoint is of another training run ({diff})")
        with self.torch.no_grad():
            for il, (w, b) in self.params.items():
                w.copy_(checkpoint["params"][il][0])
                b.copy_(checkpoint["params"][il][1])
            for src, basis in self.bases.items():
                basis.copy_(checkpoint["bases"][src])
            for name, t in self.aux_params.items():
                t.copy_(checkpoint["aux_params"][name])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
