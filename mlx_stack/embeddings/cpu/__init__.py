"""Making MLX fast on a CPU: an optimised BLAS preload, fused C++ kernels, a compiled GELU.

Kept empty (and MLX-free): ``cpu.blas`` must be importable before ``mlx.core`` is.
"""
