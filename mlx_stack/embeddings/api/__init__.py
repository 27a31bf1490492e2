"""The HTTP API: the Starlette app, request parsing, the one error type, ``/metrics``.

Kept empty (and MLX-free): import the modules themselves.
"""
