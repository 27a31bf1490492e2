"""Code that runs inside a chat tier's process: mlx_lm.server behind the stack's checks."""
