"""``python -m mlx_stack.cli``: the `mlx-stack` command."""

from mlx_stack.cli.main import main

main(prog_name="mlx-stack")
