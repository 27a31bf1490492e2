"""MLX-quantised folders on the ONNX engine: the quantised model's vectors, in float32.

A tiny random-weight bert, qwen3 and gemma3_text (with its quantised Dense layers) are
quantised with MLX's own tools (``tinyembed.quantize``: every projection and the embedding
table, 4-bit, and qwen3 8-bit too, groups of 64), then served twice by real server
processes: ``--engine mlx`` (MLX's quantised kernels) and ``--engine onnx`` (each weight
expanded to float32 while the graph is built, ``engine/dequant.py``). Both must give the
same vectors, alone and in a mixed-length batch: the same weight values, so cosine >= 0.9999
(measured: see the test).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embedserver import MIXED_TEXTS, cosines, embed, run_python, running_server
from tinyembed import build, quantize

pytestmark = pytest.mark.e2e

NAME = "tiny"
BAR = 0.9999
CASES = [("bert-mean", 4), ("qwen3", 4), ("gemma3_text", 4), ("qwen3", 8)]


@dataclass
class Served:
    kind: str
    layers: int
    cards: dict[str, dict[str, Any]]
    batch: dict[str, np.ndarray]
    alone: dict[str, np.ndarray]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{case[1]}bit")
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    kind, bits = request.param
    root = tmp_path_factory.mktemp(f"dequant-{kind}-{bits}")
    layers = quantize(build(kind, root / "model"), root / "quantised", bits)
    result = Served(kind, layers, {}, {}, {})
    for engine in ("mlx", "onnx"):
        env = {"XDG_CACHE_HOME": str(root / f"cache-{engine}"), "MLX_STACK_ENGINE": ""}
        with (running_server(root / f"{engine}.log", "--engine", engine,
                             model=root / "quantised", name=NAME, env=env) as server,
              server.client() as http):  # fmt: skip
            result.cards[engine] = http.get("/v1/models").json()["data"][0]
            result.batch[engine] = embed(http, MIXED_TEXTS, model=NAME)
            result.alone[engine] = np.concatenate(
                [embed(http, text, model=NAME) for text in MIXED_TEXTS[:4]])  # fmt: skip
    yield result


def test_onnx_serves_the_quantised_folder_with_mlx_vectors(served: Served) -> None:
    """Measured (groups of 64, min cosine over MIXED_TEXTS, ONNX vs MLX, batch and alone):
    1.0000000 to 8 decimals for all four cases: both engines compute with the same weights."""
    assert served.layers >= 10  # really quantised: every projection and the table
    for engine in ("mlx", "onnx"):
        assert served.cards[engine]["engine"] == engine
    batch = cosines(served.batch["onnx"], served.batch["mlx"])
    alone = cosines(served.alone["onnx"], served.alone["mlx"])
    print(f"\nDEQUANT {served.kind:12s} batch min cosine {float(batch.min()):.8f}, "
          f"alone {float(alone.min()):.8f}")  # fmt: skip
    assert float(batch.min()) >= BAR, np.round(batch, 6).tolist()
    assert float(alone.min()) >= BAR, np.round(alone, 6).tolist()
    # batching changes nothing on the ONNX engine either
    assert float(cosines(served.alone["onnx"], served.batch["onnx"][:4]).min()) >= BAR


_BF16 = """
import json, sys
from pathlib import Path
import mlx.core as mx, numpy as np
folder = Path({folder!r})
w = mx.random.normal((32, 128)).astype(mx.bfloat16)
packed, scales, biases = mx.quantize(w, group_size=64, bits=4)
mx.save_safetensors(str(folder / "model.safetensors"), {{"model.layers.0.mlp.up_proj.weight":
    packed, "model.layers.0.mlp.up_proj.scales": scales, "model.layers.0.mlp.up_proj.biases":
    biases}})
(folder / "config.json").write_text(json.dumps({{"quantization": {{"bits": 4, "group_size": 64}}}}))
expected = np.array(mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                  group_size=64, bits=4))
for name in [m for m in sys.modules if m.startswith(("onnx", "ml_dtypes"))]:
    del sys.modules[name]  # as a start from a cached graph: neither imported yet
from mlx_stack.embeddings.engine.onnxgraph import LazyWeights
got = LazyWeights(folder)["layers.0.mlp.up_proj.weight"]
print(got.dtype, float(np.abs(got - expected).max()))
"""


def test_bfloat16_scales_are_read_without_onnx_imported(tmp_path: Path) -> None:
    """mlx-community's bf16 conversions store ``scales``/``biases`` in bfloat16, which numpy
    knows only once ``ml_dtypes`` is imported (``onnx`` does it; a cached graph never imports
    ``onnx``): the reader registers it itself. Fresh interpreter, MLX writes the folder."""
    dtype, error = run_python(_BF16.format(folder=str(tmp_path))).split()
    assert dtype == "float32" and float(error) <= 1e-6
