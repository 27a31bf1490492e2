"""Runs in the `mlx-stack` process: parse arguments, ask the core, render the answer."""

from mlx_stack.cli.main import main

__all__ = ["main"]
