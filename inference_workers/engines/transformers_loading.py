"""Loading a causal LM for :class:`~inference_workers.engines.transformers_engine.TransformersEngine`.

Device ``"auto"`` is CUDA when available, else CPU. Dtype ``"auto"``: on CUDA bf16 (fp16 where bf16 is
unsupported); on CPU the checkpoint's own dtype (transformers reads it, for a local folder and a hub id alike),
with fp16 moved to bf16 (CPU fp16 kernels are slow). A tokenizer without a chat template gets ChatML. The
end-of-turn ids are the union of the generation config's, the tokenizer's and the chat template's; the
context is capped at the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from inference_workers.engines.base import end_of_turn_id, sampling_defaults

logger = logging.getLogger("inference_workers.engines.transformers_engine")

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Fallback for models without a chat template (base models): ChatML.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Loaded:
    """A loaded model and what the engine reads from it."""

    device: Any  # torch.device
    model: Any
    tokenizer: Any
    eos_ids: set[int]
    max_model_len: int  # the requested one, capped at the model's positions
    sampling_defaults: tuple[float, float]  # (temperature, top_p) from generation_config.json
    vocab_size: int


def load(model_path: str, device_request: str, dtype_request: str, max_model_len: int) -> Loaded:
    """Load ``model_path`` (hub id or folder) on the device; blocking (seconds): run it in a worker thread."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_request == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_request)
    if dtype_request != "auto":
        dtype: Any = getattr(torch, dtype_request)
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = "auto"  # transformers reads the checkpoint's own dtype (local folder or hub id alike)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("%s has no chat template; using ChatML", model_path)
        tokenizer.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    if device.type == "cpu" and model.dtype == torch.float16:
        model.to(torch.bfloat16)  # type: ignore[arg-type]  # CPU fp16 kernels are slow; bf16 keeps the range fp16 weights need
    model.to(device)  # type: ignore[arg-type]  # torch stubs type Module.to loosely
    model.eval()  # type: ignore[no-untyped-call]  # untyped in transformers

    eos: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    if not eos:
        logger.warning("%s defines no end-of-sequence token: generations end at max_tokens", model_path)
    text_config = model.config.get_text_config()
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and 0 < positions < max_model_len:
        logger.warning(
            "max_model_len %d exceeds the %d positions of %s; using %d",
            max_model_len,
            positions,
            model_path,
            positions,
        )
        max_model_len = positions
    return Loaded(
        device=device,
        model=model,
        tokenizer=tokenizer,
        eos_ids=eos,
        max_model_len=max_model_len,
        sampling_defaults=sampling_defaults(model.generation_config),
        vocab_size=int(text_config.vocab_size),
    )
