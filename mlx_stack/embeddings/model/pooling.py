"""Pooling per-token hidden states into one vector per text: one definition for every engine.

Written against the array API that numpy and ``mlx.core`` share (``xp`` is either module), so
the MLX engine pools its MLX arrays and the ONNX Runtime engine its numpy arrays with the same
lines. The steps after pooling (Matryoshka cut, normalisation, quantised embedding types) are
``encoder.finish`` and ``api/quantize.py``, also shared.
"""

from __future__ import annotations

from typing import Any


def pool(hidden: Any, mask: Any, pooling: str, xp: Any) -> Any:
    """Attention-mask-aware pooling over ``[batch, tokens, hidden]`` (right padding).

    ``cls``: the first token; ``last``: each row's last real token; ``mean``: the mean over
    real tokens (padding weighs nothing; an all-padding row divides by a floor, not zero).
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(axis=1) - 1
        return hidden[xp.arange(hidden.shape[0]), last]
    weights = mask.astype(xp.float32)[..., None]
    return (hidden * weights).sum(axis=1) / xp.maximum(weights.sum(axis=1), 1e-9)
