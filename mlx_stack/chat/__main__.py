"""``python -m mlx_stack.chat ARGS``: mlx_lm.server's arguments, served behind the guard."""

from .server import main

main()
