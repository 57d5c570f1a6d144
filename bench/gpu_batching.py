"""Engine batching on a GPU: transformers' continuous batching vs static batching (and vLLM where installed).

Only for a machine with a GPU — never run by tests or CI::

    .venv/bin/python bench/gpu_batching.py                        # Llama-3.2-1B-shaped, random weights, CUDA
    .venv/bin/python bench/gpu_batching.py --preset tiny --device cpu --streams 1,4   # CPU smoke run

The model has a realistic architecture and **random weights** (no weights can be downloaded where this
project is built): ``--preset llama-1b`` is Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 query / 8
KV heads, MLP 8192) with the project's locally trained tokenizer (a small vocabulary, so the embedding
and LM head are smaller than the real model's). Output is noise; speed is what is measured. Every
request gets a prompt of about ``--prompt-tokens`` tokens and up to ``--max-tokens`` tokens (static
batching is held to exactly that with ``min_new_tokens``; the engines stop at EOS, which random weights
rarely hit); throughput counts the tokens each mode really generated.

Modes, each at 1/8/32/128 concurrent streams (``--streams``):

* ``continuous``: :class:`inference_workers.engines.transformers_engine.TransformersEngine` in its
  default mode (transformers' ``ContinuousBatchingManager``, paged KV cache) with N requests in flight;
* ``static``: ``model.generate`` on one left-padded batch of N prompts (what a naive server does);
* ``vllm``: our vLLM engine (``AsyncLLM``) with N requests in flight, if ``import vllm`` works.

Reported: aggregate generated tokens/s (N x max_tokens / wall time) and per-stream TPOT. Writes
``bench/results/gpu_batching.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import report

from chatbus.tiny_model import build_tiny_model
from core.config import ROOT
from inference_workers.engines import GenerationRequest
from inference_workers.engines.transformers_engine import TransformersEngine

PRESETS: dict[str, dict[str, Any]] = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8},
    "tiny": {},  # the project's tiny model as built (2 layers, hidden 128)
}


def build_model(preset: str, out: Path) -> Path:
    """The tiny model's tokenizer with ``preset``'s architecture and random bf16/fp32 weights, saved in ``out``."""
    tiny = build_tiny_model(ROOT / ".build" / "tiny-model")
    if not PRESETS[preset]:
        return tiny
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    base = LlamaConfig.from_pretrained(tiny)
    config = LlamaConfig(**{**base.to_dict(), **PRESETS[preset], "max_position_embeddings": 4096, "torch_dtype": "bfloat16"})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (tiny / extra).exists():
            shutil.copy(tiny / extra, out / extra)
    return out


def prompt(tokens: int, i: int) -> list[dict[str, str]]:
    words = " ".join(f"w{(i * 7 + k) % 997}" for k in range(tokens))
    return [{"role": "user", "content": words}]


async def run_engine(engine: Any, n: int, prompt_tokens: int, max_tokens: int) -> dict[str, float]:
    async def one(i: int) -> tuple[int, float, float]:
        gen = GenerationRequest(request_id=f"r{n}-{i}", messages=prompt(prompt_tokens, i), max_tokens=max_tokens, temperature=0.0, seed=i)
        t0 = time.perf_counter()
        first, count = None, 0
        async for delta in engine.generate(gen):
            if first is None and delta.text:
                first = time.perf_counter()
            count = delta.completion_tokens
        end = time.perf_counter()
        return count, (first or end) - t0, end - (first or end)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    tpot = [r[2] / max(r[0] - 1, 1) for r in results]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": report.pct([r[1] * 1000 for r in results], 50),
        "tpot_p50_ms": report.pct([t * 1000 for t in tpot], 50),
    }


def run_static(model_dir: Path, device: str, n: int, prompt_tokens: int, max_tokens: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    texts = [tok.apply_chat_template(prompt(prompt_tokens, i), tokenize=False, add_generation_prompt=True) for i in range(n)]
    batch = tok(texts, return_tensors="pt", padding=True).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = int((out.shape[1] - batch["input_ids"].shape[1]) * n)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_ms": float("nan"), "tpot_p50_ms": wall / max_tokens * 1000}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--streams", default="1,8,32,128")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--modes", default="continuous,static,vllm")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.preset, Path(tmp) / "model")
        if "continuous" in modes:
            engine = TransformersEngine(str(model_dir), device=args.device, max_model_len=args.prompt_tokens + args.max_tokens + 64)
            await engine.start()
            for n in streams:
                rows.append({"mode": "continuous", "streams": n, **await run_engine(engine, n, args.prompt_tokens, args.max_tokens)})
            await engine.stop()
        if "static" in modes:
            for n in streams:
                rows.append({"mode": "static", "streams": n, **run_static(model_dir, args.device, n, args.prompt_tokens, args.max_tokens)})
        if "vllm" in modes:
            try:
                import vllm  # noqa: F401

                from inference_workers.engines.vllm_engine import VllmEngine

                engine = VllmEngine(str(model_dir), max_model_len=args.prompt_tokens + args.max_tokens + 64)
                await engine.start()
                for n in streams:
                    rows.append({"mode": "vllm", "streams": n, **await run_engine(engine, n, args.prompt_tokens, args.max_tokens)})
                await engine.stop()
            except ImportError:
                print("vllm not installed: skipped")
    md = report.table(
        ["mode", "streams", "tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)", "wall (s)"],
        [[r["mode"], r["streams"], round(r["tokens_per_s"], 1), round(r["ttft_p50_ms"], 1), round(r["tpot_p50_ms"], 2), round(r["wall_s"], 2)] for r in rows],
    )
    fig, ax = report.figure()
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        ax.plot([r["streams"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"{args.preset} (random weights), {args.device}, {args.prompt_tokens}+{args.max_tokens} tokens")
    ax.legend()
    report.write(
        "gpu_batching" if args.device.startswith("cuda") else "gpu_batching_cpu_smoke",
        {"preset": args.preset, "device": args.device, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "rows": rows},
        md,
        fig,
    )


if __name__ == "__main__":
    asyncio.run(main())
