"""``python -m mlx_stack.embeddings``: serve one local embedding model over HTTP.

Loads an optimised BLAS before anything can import ``mlx.core`` (see ``cpu/blas.py``): after that
import it would have no effect.
"""

from .cpu import blas

blas.preload()

from .cli import main  # noqa: E402  (must follow the preload)

raise SystemExit(main())
