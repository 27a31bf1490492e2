"""The server's runtime state: the model's loading and status, admission, dynamic batching.

Kept empty (and MLX-free): import the modules themselves.
"""
