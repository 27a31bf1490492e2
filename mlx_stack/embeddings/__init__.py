"""mlx-stack's OpenAI-compatible embeddings server (``python -m mlx_stack.embeddings``).

Importing this package must not import MLX: an optimised BLAS has to be loaded first (see
``blas.py``), so the MLX-using modules (``model``, ``server``) are imported only by name.
"""

from .architectures import SUPPORTED_ARCHITECTURES

__all__ = ["SUPPORTED_ARCHITECTURES"]
