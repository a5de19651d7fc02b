"""Between a parsed sequence state and per-model-layer K and V.

A state lists layers per KV cache (an iSWA model: full-attention layers, then sliding ones),
in model order within each cache; ``ModelInfo.cache_layer_groups`` names them. A predicted
state is written in the destination context's own layout (``CacheLayout``, probed once from
that context), which llama.cpp checks on ``llama_state_seq_set_data``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcli.errors import StateFormatError
from kvcli.models.model_info import ModelInfo
from kvcli.state.codec import CacheBlob, LayerKV, SeqState, StreamState


@dataclass
class LayerCells:
    """One model layer's cells: positions (sorted) with their K and V rows."""

    positions: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_type: int
    v_type: int


def layers_by_index(state: SeqState, info: ModelInfo) -> dict[int, LayerCells]:
    """Map a single-stream state's layers to model layer indices, cells sorted by position."""
    groups = info.cache_layer_groups
    if len(state.blobs) != len(groups):
        raise StateFormatError(
            f"state has {len(state.blobs)} KV caches, {info.path.name} implies {len(groups)}"
        )
    out = {}
    for blob, group in zip(state.blobs, groups):
        if len(blob.streams) != 1:
            raise StateFormatError(f"state has {len(blob.streams)} streams; kvcli needs one")
        stream = blob.streams[0]
        if stream is None:
            continue
        if len(stream.layers) != len(group):
            raise StateFormatError(
                f"a KV cache holds {len(stream.layers)} layers, {info.path.name} implies {len(group)}"
            )
        order = np.argsort(stream.positions, kind="stable")
        if not np.all(order == np.arange(len(order))):
            positions = stream.positions[order]
        else:
            order, positions = slice(None), stream.positions
        for il, layer in zip(group, stream.layers):
            out[il] = LayerCells(
                positions=positions,
                k=layer.k[order],
                v=layer.v[order],
                k_type=layer.k_type,
                v_type=layer.v_type,
            )
    return out


@dataclass
class CacheLayout:
    """A context's state layout: cache groups, V transposition, per-layer KV types."""

    groups: list[list[int]]
    v_trans: bool
    k_types: dict[int, int]
    v_types: dict[int, int]

    @classmethod
    def probe(cls, state: SeqState, info: ModelInfo) -> CacheLayout:
        layers = layers_by_index(state, info)
        v_trans = {s.v_trans for b in state.blobs for s in b.streams if s is not None}
        if len(v_trans) != 1:
            raise StateFormatError("could not read the context's V layout from its state")
        return cls(
            groups=info.cache_layer_groups,
            v_trans=v_trans.pop(),
            k_types={il: c.k_type for il, c in layers.items()},
            v_types={il: c.v_type for il, c in layers.items()},
        )

    def build_state(
        self, group_positions: list[np.ndarray], kv: dict[int, tuple[np.ndarray, np.ndarray]], seq_id: int = 0
    ) -> SeqState:
        """A state holding, per cache group, cells at ``group_positions[g]`` with K, V rows.

        ``kv[l]`` rows must match the positions of layer l's group; ``write_seq_state``
        casts them to the layout's types as it writes them.
        """
        blobs = []
        for group, positions in zip(self.groups, group_positions):
            if len(positions) == 0:
                blobs.append(CacheBlob(streams=[None]))
                continue
            layers = []
            for il in group:
                k, v = kv[il]
                if k.shape[0] != len(positions) or v.shape[0] != len(positions):
                    raise ValueError(f"layer {il}: {len(k)} rows for {len(positions)} cells")
                kt, vt = self.k_types[il], self.v_types[il]
                layers.append(LayerKV(k_type=kt, k=k, v_type=vt, v=v))
            seq = np.full(1, seq_id, dtype=np.int32)
            stream = StreamState(
                positions=np.asarray(positions, np.int32),
                seq_ids=[seq] * len(positions),
                v_trans=self.v_trans,
                layers=layers,
            )
            blobs.append(CacheBlob(streams=[stream]))
        return SeqState(seq_id=seq_id, blobs=blobs)
