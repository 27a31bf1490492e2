"""A model folder: its settings, architecture, MLX network, tokenizer and content identity.

Kept empty (and MLX-free): ``model.architectures`` and ``model.settings`` are imported before
the BLAS preload, which must precede ``mlx.core``.
"""
