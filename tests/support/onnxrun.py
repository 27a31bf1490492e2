"""Running a built ONNX graph in tests: a session, one forward pass, right-padded random ids."""

from __future__ import annotations

from typing import Any

import numpy as np


def session(model: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(sess: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    (hidden,) = sess.run(None, {"input_ids": ids.astype(np.int32),
                                "attention_mask": mask.astype(np.int32)})  # fmt: skip
    return np.asarray(hidden)


def right_padded(seed: int, lengths: list[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1, vocab, n)
        mask[row, :n] = 1
    return ids, mask
