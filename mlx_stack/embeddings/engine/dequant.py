"""MLX-quantised weights back to float32, for the ONNX engine on machines without Metal.

MLX's CPU kernels for quantised products are slow (EmbeddingGemma-300M 4-bit: ~5 s a short
query against 0.25 s in float32, measured on a 2-core AVX2 EPYC), so the ONNX engine serves
an mlx-community quantised folder by expanding each weight while it builds the graph: the
vectors are the quantised model's (the same weight values), at float32 speed and float32
memory. Only MLX's ``affine`` scheme: a layer's ``weight`` is packed ``uint32`` (``bits``
per value, the lowest bits first, a row's values as one little-endian bit stream), with
``scales`` and ``biases`` per group of ``group_size`` values along the input axis, and
``w = scale * q + bias``. Quantised embedding tables use the same layout. ``config.json``'s
``quantization`` gives the default ``bits``/``group_size`` and may override them per layer
(``"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 64}``, or ``false``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

BITS = (2, 3, 4, 5, 6, 8)
"""Widths whose packing this reads (checked against ``mx.dequantize`` in the unit tests)."""
_ROWS = 4096
"""Rows expanded at a time: a 151k-row 4-bit table never needs its unpacked bits whole."""


class QuantisationUnsupported(ValueError):
    """The folder's quantisation is not one this module can expand (the reason inside)."""


@dataclass(frozen=True)
class Scheme:
    """One layer's packing."""

    bits: int
    group_size: int

    @classmethod
    def parse(cls, where: str, value: Any, default: Scheme | None = None) -> Scheme:
        if not isinstance(value, dict):
            raise QuantisationUnsupported(f"{where}: {value!r} is not an object")
        bits = value.get("bits", default.bits if default else None)
        group = value.get("group_size", default.group_size if default else None)
        for name, number in (("bits", bits), ("group_size", group)):
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise QuantisationUnsupported(f"{where}.{name}: {number!r} is not a positive "
                                              "integer")  # fmt: skip
        if bits not in BITS:
            raise QuantisationUnsupported(f"{where}.bits: {bits} (MLX's affine packing is read "
                                          f"for {', '.join(map(str, BITS))} bits)")  # fmt: skip
        return cls(bits, group)


@dataclass(frozen=True)
class Quantisation:
    """``config.json``'s ``quantization``: the default scheme and per-layer overrides."""

    default: Scheme
    overrides: dict[str, Scheme | None] = field(default_factory=dict)
    """By MLX module path (``model.layers.0.mlp.down_proj``); ``None``: left unquantised."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Quantisation | None:
        """``None`` for a float folder; raises :class:`QuantisationUnsupported` with the field."""
        value = config.get("quantization")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise QuantisationUnsupported(f"config.json quantization: {value!r} is not an object")
        mode = value.get("mode", "affine")
        if mode != "affine":
            raise QuantisationUnsupported(f"config.json quantization.mode {mode!r} (only "
                                          "MLX's 'affine' scale-and-bias scheme)")  # fmt: skip
        default = Scheme.parse("config.json quantization", value)
        overrides: dict[str, Scheme | None] = {}
        for key, item in value.items():
            if key in ("bits", "group_size", "mode"):
                continue
            where = f"config.json quantization[{key!r}]"
            if item is False:
                overrides[key] = None
            elif item is True:
                overrides[key] = default
            elif isinstance(item, dict):
                if item.get("mode", "affine") != "affine":
                    raise QuantisationUnsupported(f"{where}.mode {item['mode']!r} (only "
                                                  "'affine')")  # fmt: skip
                overrides[key] = Scheme.parse(where, item, default)
            else:
                raise QuantisationUnsupported(f"{where}: {item!r} (a bool or "
                                              "{bits, group_size})")  # fmt: skip
        return cls(default, overrides)

    def scheme(self, module: str) -> Scheme:
        """The scheme of the layer at MLX path ``module`` (which has ``scales``)."""
        found = self.overrides.get(module, self.default)
        return self.default if found is None else found


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray,
               scheme: Scheme, name: str = "weight") -> np.ndarray:  # fmt: skip
    """The float32 ``[..., inputs]`` weight of one quantised layer (checked shapes)."""
    bits, group = scheme.bits, scheme.group_size
    if packed.dtype != np.uint32:
        raise QuantisationUnsupported(f"{name}: packed weight is {packed.dtype}, not uint32")
    inputs, rest = divmod(packed.shape[-1] * 32, bits)
    groups = inputs // group if inputs % group == 0 else -1
    if (rest or packed.ndim < 1 or scales.shape != biases.shape
            or scales.shape != (*packed.shape[:-1], groups)):  # fmt: skip
        raise QuantisationUnsupported(
            f"{name}: packed {list(packed.shape)}, scales {list(scales.shape)}, biases "
            f"{list(biases.shape)} do not fit {bits} bits in groups of {group}")  # fmt: skip
    rows = packed.reshape(-1, packed.shape[-1])
    scale = scales.reshape(-1, groups, 1).astype(np.float32)
    bias = biases.reshape(-1, groups, 1).astype(np.float32)
    out = np.empty((rows.shape[0], groups, group), np.float32)
    for start in range(0, rows.shape[0], _ROWS):
        stop = start + _ROWS
        q = _unpack(rows[start:stop], bits).reshape(-1, groups, group)
        np.multiply(q, scale[start:stop], out=out[start:stop])
        out[start:stop] += bias[start:stop]
    return out.reshape(*packed.shape[:-1], inputs)


def _unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """``[rows, words]`` uint32 to ``[rows, values]`` uint8, lowest bits first."""
    if 32 % bits == 0:  # 2, 4, 8: whole values per word
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        mask = np.uint32((1 << bits) - 1)
        values = (words[..., None] >> shifts) & mask
        return values.astype(np.uint8).reshape(words.shape[0], -1)
    stream = np.unpackbits(np.ascontiguousarray(words).astype("<u4").view(np.uint8),
                           axis=-1, bitorder="little")  # fmt: skip
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream.reshape(words.shape[0], -1, bits) * weights).sum(-1, dtype=np.uint8)
