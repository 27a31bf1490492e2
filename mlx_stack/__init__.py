"""mlx-stack: a supervisor for a local multi-model MLX LLM stack behind one LiteLLM endpoint."""

__version__ = "0.1.0"
__all__ = ["__version__"]
