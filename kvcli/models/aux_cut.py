"""Cut an auxiliary model from a base GGUF by keeping some of its layers (gguf-py).

The kept blocks are renumbered 0..k-1; the token embedding, tokenizer, output norm and LM
head stay, so the auxiliary also runs alone. The auxiliary records which base layers it
holds and the base's fingerprint (keys.py): a calibration then knows which of its layers are
exact copies of the base's. For Gemma 3 the per-layer attention type is
written as a bool array (``sliding_window_pattern``): without it llama.cpp would derive the
pattern from the new layer index, which is wrong for a strided layer set (docs/design.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from kvcli import keys
from kvcli.atomic import write_atomically
from kvcli.choices import parse_list
from kvcli.errors import KvcliError
from kvcli.models.model_info import SUPPORTED_ARCHS, read_model_info

_BLOCK = re.compile(r"^blk\.(\d+)\.(.*)$")


def prefix_layers(n_keep: int) -> list[int]:
    return list(range(n_keep))


def stride_layers(n_layer: int, stride: int, *, include_last: bool = True) -> list[int]:
    """Every ``stride``-th layer from 0 (the paper's KVP-LP), plus the last one if asked."""
    if stride < 1:
        raise KvcliError(f"--stride must be at least 1, not {stride}")
    layers = list(range(0, n_layer, stride))
    if include_last and layers[-1] != n_layer - 1:
        layers.append(n_layer - 1)
    return layers


def parse_layers(spec: str, n_layer: int) -> list[int]:
    """'0-4' or '0,4,8' -> layer indices; they must be increasing, distinct, in range."""
    layers = parse_list(spec, "--layers (e.g. 0-4 or 0,4,8)", int, ranges=True, distinct=True)
    if layers != sorted(layers):
        raise KvcliError(f"the layer list {spec!r} is not in increasing order")
    if layers[0] < 0 or layers[-1] >= n_layer:
        raise KvcliError(f"layers {spec!r} must lie in 0..{n_layer - 1}")
    return layers


def cut_auxiliary(
    base_path: str | Path, out_path: str | Path, layers: list[int], replace: dict | None = None
) -> Path:
    """Write a GGUF holding only ``layers`` of the base (renumbered), atomically.

    ``replace``: new float32 values of some tensors (by their name in the output), written
    as F16 (matrices) or F32 (vectors): a trained auxiliary written back."""
    import gguf

    info = read_model_info(base_path)
    if info.arch not in SUPPORTED_ARCHS:
        raise KvcliError(f"cannot cut an auxiliary from architecture {info.arch!r}")
    if not layers or layers[-1] >= info.n_layer or layers != sorted(set(layers)):
        raise KvcliError(f"layers {layers} are not an increasing subset of 0..{info.n_layer - 1}")
    new_index = {old: new for new, old in enumerate(layers)}
    arch = info.arch
    reader = gguf.GGUFReader(info.path)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue
            if field.name in (
                f"{arch}.block_count",
                f"{arch}.attention.sliding_window_pattern",
                keys.AUX_BASE_LAYERS,
                keys.AUX_BASE_FINGERPRINT,
            ):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if isinstance(value, list) and len(value) == info.n_layer and field.name.startswith(arch):
                value = [value[i] for i in layers]  # per-layer arrays (head counts, ...)
            writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        writer.add_uint32(f"{arch}.block_count", len(layers))
        source = [info.source_layers[i] for i in layers] if info.source_layers else layers
        writer.add_array(keys.AUX_BASE_LAYERS, source)
        writer.add_string(keys.AUX_BASE_FINGERPRINT, info.source_fingerprint or info.fingerprint)
        if info.n_swa > 0:
            writer.add_array(
                f"{arch}.attention.sliding_window_pattern", [bool(info.is_swa[i]) for i in layers]
            )
        kept = []
        for tensor in reader.tensors:
            m = _BLOCK.match(tensor.name)
            if m and int(m.group(1)) not in new_index:
                continue
            name = f"blk.{new_index[int(m.group(1))]}.{m.group(2)}" if m else tensor.name
            data, qtype = tensor.data, tensor.tensor_type
            if replace and name in replace:
                data = np.asarray(replace[name], np.float16 if replace[name].ndim > 1 else np.float32)
                qtype = gguf.GGMLQuantizationType.F16 if data.ndim > 1 else gguf.GGMLQuantizationType.F32
            kept.append((name, data))
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data in kept:
            writer.write_tensor_data(data)
        writer.close()

    return write_atomically(Path(out_path), write)
