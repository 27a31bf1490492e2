"""Which engine runs the encoder: MLX everywhere, or ONNX Runtime on CPUs where it is faster.

- ``choice.py``: the decision (pure, MLX-free): forced, Metal, unsupported, cached, measured.
- ``onnxgraph.py``: a BERT-family encoder as an ONNX graph, built from the folder's weights.
- ``onnxdecoder.py``: the same for the decoder embedders (qwen3, gemma3_text as EmbeddingGemma).
- ``onnxnomic.py``: the same for nomic_bert (nomic-embed-text), rotary before attention.
- ``onnxencoder.py``: that graph under ONNX Runtime, with the MLX engine's interface.
- ``select.py``: loads the chosen engine, measuring both on first start (imports MLX lazily).
- ``report.py``: what ``mlx-stack doctor`` says about it (reads the cache, loads nothing).

Importing this package must not import MLX (the BLAS preload must come first).
"""
