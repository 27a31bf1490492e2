"""``python -m mlx_stack.embeddings``: serve one local embedding model over HTTP.

The optimised BLAS must be loaded before anything imports ``mlx.core`` (see ``cpu/blas.py``):
``cli.main`` loads it, measured for the model folder, once the arguments are checked and the
port is bound; importing ``cli`` does not import MLX.
"""

from .cli import main

raise SystemExit(main())
