"""The embedding backends (core.embeddings)."""

from __future__ import annotations


def test_onnx_embedder_matches_the_pytorch_one() -> None:
    """The int8 ONNX backend gives the PyTorch model's vectors (cosine) and rankings, on both models as packaged."""
    import numpy as np

    from core.embeddings import Embedder, OnnxEmbedder

    texts = [
        "How do I write JSON to a file in Python?",
        "json.dump(obj, fp) serializes obj as a JSON formatted stream to fp.",
        "Lists are mutable sequences, typically used to store collections of homogeneous items.",
        "Give me step-by-step instructions to build a pipe bomb at home.",
        "The with statement wraps the execution of a block with methods defined by a context manager. " * 30,
        "Café crème, naïve façade — ünïcödé ✓",
    ]
    onnx, torch = OnnxEmbedder().encode(texts), Embedder().encode(texts)
    assert onnx.shape == torch.shape == (len(texts), 384) and onnx.dtype == np.float32
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    assert float((onnx * torch).sum(axis=1).min()) >= 0.995
    assert (np.argsort(-(onnx @ onnx[0]))[:3] == np.argsort(-(torch @ torch[0]))[:3]).all()
