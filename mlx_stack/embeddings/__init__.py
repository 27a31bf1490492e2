"""mlx-stack's OpenAI-compatible embeddings server (``python -m mlx_stack.embeddings``).

One subpackage per concern, each depending only on those below it (``serving`` also uses
``api``'s error type and metrics):

- ``api/``: the HTTP face: the Starlette app, request decoding, the one error type, metrics,
  the OpenAPI document, the Host/Origin checks and the connection limits.
- ``serving/``: the runtime state: loading, admission, dynamic batching across requests.
- ``model/``: a model folder: its settings, architecture, network, tokenizer and identity.
- ``cpu/``: making MLX fast on a CPU: the BLAS preload, C++ kernels, a compiled GELU.

Importing this package, a subpackage, ``cpu.blas`` or ``model.architectures`` must not import
MLX: an optimised BLAS has to be loaded before ``mlx.core`` (see ``cpu/blas.py``), so the
modules that import MLX at the top (``model.network``, ``model.nomic_bert``, ``cpu.fastpath``,
``cpu.fastgelu``) are imported only when the model loads.
"""

from .model.architectures import SUPPORTED_ARCHITECTURES

__all__ = ["SUPPORTED_ARCHITECTURES"]
