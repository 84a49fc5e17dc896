"""`imserver`: run the server, or mint a development token.

imserver [options]                      run (embedded default: SQLite under --data-dir)
imserver token USER --device D          print a login token for USER on device D
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogBeginner, jsonFileLogObserver, textFileLogObserver

from improto.tokens import MAX_TOKEN_LIFETIME_S, mint
from improto_server.config import Config

DESCRIPTION = """\
improto IM server. With no options it runs the embedded default: no external service,
all data in SQLite under --data-dir, listening on tcp:5555 on 127.0.0.1. Settings come from
defaults, then the --config TOML file (keys named like the long options with '_' for '-',
e.g. listen = ["tcp:5555"], idle_timeout = 90), then the flags given here.
Subcommand: 'imserver token USER --device D' prints a development login token."""


# (flag, argparse keywords): one table, so --help documents every setting of Config.
_RUN_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--config", {"metavar": "FILE", "help": "TOML file with settings (flags override it)"}),
    (
        "--listen",
        {
            "action": "append",
            "metavar": "ENDPOINT",
            "help": "Twisted server endpoint string, repeatable; default "
            "tcp:5555:interface=127.0.0.1; e.g. tcp:5555, "
            "ssl:5556:privateKey=key.pem:certKey=cert.pem",
        },
    ),
    ("--data-dir", {"help": "embedded database and generated JWT secret (default ./var)"}),
    (
        "--jwt-secret",
        {
            "help": "HS256 secret of login tokens (default: the file "
            "<data-dir>/jwt-secret, created on first run)"
        },
    ),
    (
        "--node-id",
        {
            "type": int,
            "help": "0..1023, unique per gateway (part of message ids; default: 0 embedded, "
            "a node leased in Redis in production)",
        },
    ),
    (
        "--gateway-id",
        {
            "help": "name of this gateway in the presence map and push routing (production; "
            "default: random per start)",
        },
    ),
    (
        "--heartbeat",
        {
            "type": int,
            "metavar": "SECONDS",
            "help": "client PING interval announced in HELLO_OK (default 30)",
        },
    ),
    (
        "--idle-timeout",
        {
            "type": int,
            "metavar": "SECONDS",
            "help": "close connections silent this long (default 90)",
        },
    ),
    ("--inbox-retention-days", {"type": float, "help": "offline inbox retention (default 7)"}),
    ("--log-format", {"choices": ["text", "json"], "help": "text (default) or json lines"}),
    (
        "--push-gateway",
        {"metavar": "URL", "help": "push gateway for notifications (spec/PUSH_GATEWAY.md)"},
    ),
    (
        "--api-listen",
        {
            "metavar": "ENDPOINT",
            "help": "server API endpoint (default tcp:5580:interface=127.0.0.1)",
        },
    ),
    ("--api-key", {"help": "bearer key of the server API (the API is off without one)"}),
    ("--history-retention-days", {"type": float, "help": "history retention (default 180)"}),
    (
        "--max-unacked-pushes",
        {"type": int, "help": "push window per connection before SYNC_HINT (1000)"},
    ),
]
_PRODUCTION_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--storage", {"choices": ["embedded", "memory", "production"],
                   "help": "embedded (default: SQLite, no external service), memory (the "
                           "same in RAM: persistence off, lost at exit; for benchmarks) "
                           "or production"}),
    ("--role", {"choices": ["all", "gateway", "persister", "notifier"],
                "help": "all (default): everything in one process; gateway: client "
                        "connections only; persister: queue consumer only; notifier: push "
                        "notifications only (production storage)"}),
    ("--redis", {"metavar": "HOST:PORT", "help": "default 127.0.0.1:6379"}),
    ("--redis-cluster", {"metavar": "HOST:PORT[,HOST:PORT...]",
                         "help": "a Redis Cluster's seed nodes, used instead of --redis"}),
    ("--amqp", {"metavar": "URL",
                "help": "RabbitMQ URL, default amqp://guest:guest@127.0.0.1:5672/%%2F"}),
    ("--hbase", {"metavar": "HOST:PORT", "help": "HBase Thrift1 server, default 127.0.0.1:9090"}),
    ("--hbase-table", {"help": "history table (default improto_history)"}),
    ("--key-prefix", {"help": "prefix of Redis keys and queue names (default im)"}),
    ("--queue-partitions", {"type": int,
                            "help": "persistence queues, by conversation hash (default 1)"}),
    ("--workers", {"type": int, "metavar": "N",
                   "help": "gateway processes sharing the listening port (SO_REUSEPORT), "
                           "plus one persister (and notifier) with --role all; API port + i "
                           "for worker i (production storage; default 1)"}),
]  # fmt: skip


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imserver",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, kw in _RUN_OPTIONS:
        p.add_argument(flag, **kw)
    prod = p.add_argument_group(
        "production stack",
        "--storage production keeps messages in RabbitMQ (queue), Redis (offline inboxes, "
        "positions, groups, dedup) and HBase (history) instead of SQLite; "
        "'scripts/services start' runs all three locally",
    )
    for flag, kw in _PRODUCTION_OPTIONS:
        prod.add_argument(flag, **kw)
    return p


def token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imserver token", description="Print a login token.")
    p.add_argument("user", type=int, help="user id (1..2^64-1)")
    p.add_argument("--device", required=True, help="device id the token is bound to")
    p.add_argument("--ttl", type=float, default=86400.0, help="seconds of validity (default 1 day)")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--data-dir")
    p.add_argument("--jwt-secret")
    return p


def load_config(args: argparse.Namespace) -> Config:
    config = Config.from_file(args.config) if args.config else Config()
    values = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
    return config.merged(values)


# The client libraries of the production stack, installed by the `production` extra.
PRODUCTION_MODULES = ("txredisapi", "pika", "happybase")


def missing_production_modules() -> list[str]:
    return [name for name in PRODUCTION_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "token":
        args = token_parser().parse_args(argv[1:])
        config = load_config(args)
        if not 0 < args.ttl <= MAX_TOKEN_LIFETIME_S:  # the server refuses longer lifetimes
            token_parser().error(f"--ttl must be in 1..{MAX_TOKEN_LIFETIME_S} seconds")
        print(mint(config.secret(), args.user, args.device, ttl_s=args.ttl))
        return 0
    parser = run_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
        config.check()
    except ValueError as e:
        parser.error(str(e))
    if config.storage == "production" and (missing := missing_production_modules()):
        parser.error(
            f"--storage production needs {', '.join(missing)}: pip install 'improto[production]'"
        )
    from improto_server import workers

    child = workers.from_env()  # set when a --workers supervisor started this process
    json = config.log_format == "json"
    observer: ILogObserver = (
        jsonFileLogObserver(sys.stderr) if json else textFileLogObserver(sys.stderr)
    )  # json: one JSON object per line (twisted.logger's format), for log shippers
    if child is not None:
        observer = workers.tagged(observer, child.label, json)
        config = workers.child_config(config, child.kind, child.index)
    globalLogBeginner.beginLoggingTo([observer])
    if child is None and config.workers > 1:
        return workers.supervise(config, argv)

    from twisted.internet import task

    from improto_server.app import Server
    from improto_server.reactor_types import IServerReactor

    async def serve(reactor: IServerReactor) -> None:
        listen = None if child is None else child.listener(reactor, config)
        server = Server(config, reactor, listen=listen)
        await server.start()
        if child is not None:
            child.ready()
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromCoroutine(server.stop())
        )
        await Deferred()  # until SIGINT/SIGTERM stops the reactor

    task.react(lambda r: Deferred.fromCoroutine(serve(r)))
    return 0  # react() exits the process itself
