"""A fast exact-GELU replacement for MLX's CPU backend.

On the CPU, ``mx.erf`` and ``mx.exp`` run at ~20-40 M elements/s (scalar libm) against ~2,000 M
for a multiply, so once matmuls use an optimised BLAS the exact GELU of a BERT layer costs more
than its matmuls. Abramowitz & Stegun 7.1.28 needs no transcendental function:
``erf(a) = 1 - (1 + a1 a + ... + a6 a^6)^-16`` for ``a >= 0`` (|error| <= 3e-7); under
``mx.compile`` it fuses into one kernel, ~30x faster, max abs error ~1e-6 against ``nn.gelu``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

_A = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


def _gelu(x: mx.array) -> mx.array:
    # float32 even for half-precision models: p**16 would overflow float16
    a = mx.minimum(mx.abs(x).astype(mx.float32) * (1 / math.sqrt(2)), 6.0)  # erf(6) == 1
    p = 1.0 + a * (_A[0] + a * (_A[1] + a * (_A[2] + a * (_A[3] + a * (_A[4] + a * _A[5])))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    erf_abs = 1.0 - 1.0 / p
    # 0.5 x (1 + sign(x) erf|z|) == 0.5 (x + |x| erf|z|)
    return 0.5 * (x + mx.abs(x) * erf_abs.astype(x.dtype))


fast_gelu = mx.compile(_gelu, shapeless=True)


class FastGELU(nn.Module):
    """Drop-in for ``nn.GELU()`` (``approx="none"``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return fast_gelu(x)


def install(model: nn.Module) -> int:
    """Swap every exact ``nn.GELU`` module for :class:`FastGELU`; returns how many.

    Returns 0, leaving the model untouched, if the compiled kernel cannot be built (``mx.compile``
    on the CPU needs a C++ compiler) or disagrees with ``nn.gelu``.
    """
    if not _works():
        return 0
    swapped = 0
    for _, module in model.named_modules():
        for key, child in list(module.items()):
            if isinstance(child, nn.GELU) and getattr(child, "_approx", None) == "none":
                setattr(module, key, FastGELU())
                swapped += 1
    return swapped


def _works() -> bool:
    try:
        x = mx.linspace(-8.0, 8.0, 4097)
        error = mx.abs(fast_gelu(x) - nn.gelu(x)).max()
        return bool(error.item() < 1e-5)
    except Exception:  # any failure to compile or run means: keep the exact GELU
        return False
