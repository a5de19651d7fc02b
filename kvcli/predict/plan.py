"""Which base layers a predictor copies from the auxiliary, which it predicts, and from which
auxiliary layer and features.

Which layers are copied: an auxiliary cut by kvcli records its base layers and the base's
fingerprint; its leading layers 0..j that are the base's layers 0..j hold the base's exact
cache, and the first calibration prompt checks that bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcli import keys
from kvcli.choices import parse_list
from kvcli.errors import KvcliError
from kvcli.models.model_info import ModelInfo


@dataclass(frozen=True)
class CalibrationPlan:
    copied_layers: list[int]
    layer_map: list[int]  # per base layer: its auxiliary source layer
    hidden: tuple[str, ...]  # kinds of the auxiliary's captured hidden tensors (llama/capture.py)

    @property
    def predicted_layers(self) -> list[int]:
        return [il for il in range(len(self.layer_map)) if il not in self.copied_layers]

    @property
    def sources(self) -> list[int]:
        return sorted({self.layer_map[il] for il in self.predicted_layers})

    def layers_of(self, source: int) -> list[int]:
        return [il for il in self.predicted_layers if self.layer_map[il] == source]

    @property
    def feature_kinds(self) -> tuple[str, ...]:
        return (keys.FEATURE_AUX_K, keys.FEATURE_AUX_V, *self.hidden)

    def is_prefix(self, aux: ModelInfo) -> bool:
        """The auxiliary is the base's layers 0..k-1: it runs as a view of the base."""
        return self.copied_layers == list(range(aux.n_layer))


def copied_layers(base: ModelInfo, aux: ModelInfo) -> list[int]:
    """The auxiliary's leading layers that are the base's own (a kvcli cut of this base)."""
    if aux.source_fingerprint != base.fingerprint or not aux.source_layers:
        return []
    out = []
    for i, src in enumerate(aux.source_layers):
        if src != i:
            break
        out.append(i)
    return out


def default_layer_map(base: ModelInfo, aux: ModelInfo) -> list[int]:
    """A cut of this base: each base layer from the last auxiliary layer cut from at or
    before it. Another model (KVP-C): base layer l from aux layer round(l (La-1) / (Lb-1))."""
    if aux.source_fingerprint == base.fingerprint and aux.source_layers:
        return [
            max(i for i, src in enumerate(aux.source_layers) if src <= il or i == 0)
            for il in range(base.n_layer)
        ]
    if base.n_layer == 1:
        return [0]
    return [round(il * (aux.n_layer - 1) / (base.n_layer - 1)) for il in range(base.n_layer)]


def parse_layer_map(spec: str, base: ModelInfo, aux: ModelInfo) -> list[int]:
    """'0,0,1,1,...' (one auxiliary layer per base layer) -> checked list."""
    out = parse_list(spec, "--layer-map", int)
    if len(out) != base.n_layer:
        raise KvcliError(f"the layer map has {len(out)} entries; the base has {base.n_layer} layers")
    if not all(0 <= x < aux.n_layer for x in out):
        raise KvcliError(f"the layer map names auxiliary layers outside 0..{aux.n_layer - 1}")
    return out


def make_plan(
    base: ModelInfo,
    aux: ModelInfo,
    *,
    layer_map: list[int] | None = None,
    hidden: bool | tuple[str, ...] = True,
) -> CalibrationPlan:
    """``hidden``: True for the default hidden features, False for none, or their kinds."""
    copied = copied_layers(base, aux)
    layer_map = list(layer_map or default_layer_map(base, aux))
    for il in copied:
        layer_map[il] = il
    kinds = keys.HIDDEN_FEATURES if hidden is True else tuple(hidden or ())
    if set(kinds) - set(keys.HIDDEN_KINDS):
        raise KvcliError(f"unknown hidden feature kinds {sorted(set(kinds) - set(keys.HIDDEN_KINDS))}")
    if aux.n_layer < 2:
        kinds = ()
    plan = CalibrationPlan(copied, layer_map, hidden=kinds)
    view_only = [kind for kind in plan.hidden if kind in keys.VIEW_ONLY_KINDS]
    if view_only and not plan.is_prefix(aux):
        raise KvcliError(
            "the auxiliary's last-layer output is a feature only for a prefix "
            "auxiliary of this base (it runs as a view of the base)"
        )
    if len(view_only) > 1:
        raise KvcliError("the last layer's output is a feature once: raw or normed, not both")
    return plan
