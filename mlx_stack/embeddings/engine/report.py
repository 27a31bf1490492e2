"""What ``mlx-stack doctor`` says about the embeddings engine, read without loading a model.

Reads the mode (``MLX_STACK_ENGINE``), whether ONNX Runtime is installed, and the cached
measurements (``~/.cache/mlx-stack/engine``); changes nothing and imports neither MLX nor ONNX
Runtime (the version comes from the package metadata).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ..cpu.kernels import cache_folder
from .choice import ChoiceCache, EngineError, Machine, mode_from, summary


def engine_report() -> tuple[bool, str, str]:
    """(all well, detail, fix) for the doctor's ``embeddings engine`` line."""
    try:
        mode = mode_from(None)
    except EngineError as exc:
        return False, str(exc), "unset MLX_STACK_ENGINE or set it to auto, mlx or onnx"
    try:
        onnxruntime = version("onnxruntime")
    except PackageNotFoundError:
        onnxruntime = "absent"
    machine = Machine.from_host({"onnxruntime": onnxruntime})
    return summary(mode, machine, onnxruntime, ChoiceCache(cache_folder("engine")).entries())
