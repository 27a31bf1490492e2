"""The HTTP API: the Starlette app, request decoding, the one error type, ``/metrics``,
the OpenAPI document; who may call (``access``), how slowly (``connection``), how much (``body``).

Kept empty (and MLX-free): import the modules themselves.
"""
