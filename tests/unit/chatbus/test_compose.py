"""compose.yaml cannot run here (no Docker engine): check that it parses and names only real things."""

from __future__ import annotations

import shlex

import click
import yaml

from chatbus.cli import main
from core.config import ROOT, Settings

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SETTINGS_ENV = {f.validation_alias if isinstance(f.validation_alias, str) else f"CHATBUS_{name.upper()}" for name, f in Settings.model_fields.items()}


def resolve(argv: list[str]) -> click.Command:
    """Walk the click command tree along argv; raise if a command or argument value does not exist."""
    cmd: click.Command = main
    ctx = click.Context(main)
    args = argv[1:]
    while isinstance(cmd, click.Group) and args:
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"`chatbus {' '.join(argv[1:])}`: no command {args[0]!r}"
        cmd, args = sub, args[1:]
    cmd.make_context(cmd.name or "", list(args))  # validates choices and options
    return cmd


def test_compose_has_the_cluster_the_database_the_vector_store_and_every_worker() -> None:
    services = COMPOSE["services"]
    assert {"kafka-1", "kafka-2", "kafka-3", "mongo", "milvus"} <= services.keys()
    commands = {" ".join(shlex.split(s["command"])[:3]) for s in services.values() if str(s.get("command", "")).startswith("chatbus")}
    for kind in ("safety", "retrieval", "inference", "recorder", "batches", "feedback"):
        assert f"chatbus worker {kind}" in commands
    assert "chatbus edge" in commands
    voters = services["kafka-1"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters.count("@") == 3


def test_every_chatbus_command_exists() -> None:
    for svc in COMPOSE["services"].values():
        command = svc.get("command")
        if isinstance(command, str) and command.startswith("chatbus"):
            resolve(shlex.split(command))


def test_every_chatbus_environment_name_exists_in_settings() -> None:
    for name, svc in COMPOSE["services"].items():
        for key in svc.get("environment") or {}:
            if key.startswith("CHATBUS_") or key == "MILVUS_URI":
                assert key in SETTINGS_ENV, f"{name}: {key} is not a chatbus setting"


def test_edges_own_distinct_reply_partitions() -> None:
    parts = [s["environment"]["CHATBUS_REPLY_PARTITION"] for n, s in COMPOSE["services"].items() if n.startswith("edge")]
    assert len(parts) == len(set(parts)) >= 2


def test_prometheus_scrapes_every_worker_kind_and_every_edge() -> None:
    services = COMPOSE["services"]
    config = yaml.safe_load((ROOT / "tools" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    sd = jobs["chatbus-workers"]["dns_sd_configs"][0]
    kinds = {shlex.split(s["command"])[2] for s in services.values() if str(s.get("command", "")).startswith("chatbus worker")}
    assert set(sd["names"]) == kinds
    assert str(sd["port"]) == services["safety"]["environment"]["CHATBUS_METRICS_PORT"]
    edges = {n for n, s in services.items() if str(s.get("command", "")).startswith("chatbus edge")}
    assert {t.split(":")[0] for t in jobs["chatbus-edges"]["static_configs"][0]["targets"]} == edges
    mount = services["prometheus"]["volumes"][0].split(":")[0]
    assert (ROOT / mount).resolve() == (ROOT / "tools" / "prometheus" / "prometheus.yml").resolve()
