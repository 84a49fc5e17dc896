"""Server processes and faults for bench/chaos.py: start, kill -9 and restart production-mode
gateways, persisters (and notifiers, `--push`) on loopback, or one embedded-storage server,
and delete what one run left in Redis, RabbitMQ and HBase.

Only processes started here are ever signalled, by their own pid. Service data is touched only
under the run's own key prefix, queue names and HBase table.
"""

from __future__ import annotations

import queue
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servers

from tests.support import services
from tests.support.server import terminate

START_TIMEOUT_S = 30.0
HOST = servers.HOST
free_port = servers.free_port

# Fault kinds injected (the keys of the report's "faults" dict). The service crashes are a
# `kill -9` of the service process and a restart, by `scripts/services crash`.
FAULTS = (
    "client_drops", "push_drops", "gateway_kills", "persister_kills",
    "redis_crashes", "rabbitmq_crashes", "thrift_crashes",
)  # fmt: skip
# On a Redis Cluster (--redis-cluster) a Redis fault is a master's `kill -9`: its replica is
# promoted (scripts/services redis-cluster-kill-master), the killed node rejoins as a replica.
CLUSTER_FAULTS = (*(f for f in FAULTS if f != "redis_crashes"), "redis_master_kills")
# Embedded storage: one process (gateway, persister and notifier; its kill counts as a gateway
# kill) and no services to crash.
EMBEDDED_FAULTS = ("client_drops", "push_drops", "gateway_kills")
SERVICES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services"
SERVICE_CRASH_TIMEOUT_S = 180.0


@dataclass
class ServerProc:
    """One `python -m improto_server` process; restartable with the same arguments/port."""

    name: str
    role: str  # gateway | persister | notifier (embedded: gateway, for the --role all process)
    args: list[str]
    log: Path
    port: int | None = None
    api_port: int | None = None  # --api-listen: /metrics (--push)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log_offset: int = 0

    def start(self) -> None:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            out.write(f"---- start {self.starts + 1} at {time.time():.3f}\n".encode())
            self._log_offset = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "improto_server", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Gateway: accepts TCP on its port. Persister, notifier: logged that it runs."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        if self.port is not None:
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return True
            except OSError:
                return False
        with open(self.log, "rb") as f:
            f.seek(self._log_offset)
            return f"{self.role} running".encode() in f.read()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL after 10 s."""
        if self.proc is not None:
            terminate(self.proc)

    def log_problems(self) -> tuple[Counter[str], list[str]]:
        """Counts of error-level lines and tracebacks in this process' log, with examples."""
        counts: Counter[str] = Counter()
        examples: list[str] = []
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return counts, examples
        for line in lines:
            for mark in ("#error]", "#critical]", "#warn]", "Traceback"):
                if mark in line:
                    counts[mark.strip("#]")] += 1
                    if mark != "#warn]" and len(examples) < 3:
                        examples.append(f"{self.name}: {line[:300]}")
        return counts, examples

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    """2 gateways + 2 persisters (by default) sharing one key prefix, table and secret; or,
    with storage "embedded", one `--role all` process on SQLite (in `gateways`).

    `settings`: server settings (TOML keys, e.g. the push timings of --push and the large-group
    threshold) written to `<workdir>/server.toml`, which every process gets as `--config`.
    `push_url` (--push): every process gets `--push-gateway <push_url>/<its name>` (so the
    gateway stand-in tells the notifiers apart); production adds `notifiers_n` `--role
    notifier` processes. With `api_key`, every process that runs a notifier (gateways,
    notifiers, the embedded server) serves /metrics on its own port."""

    workdir: Path
    prefix: str
    secret: str
    gateways_n: int = 2
    persisters_n: int = 2
    partitions: int = 2
    storage: str = "production"
    settings: dict[str, Any] = field(default_factory=dict)
    push_url: str | None = None
    api_key: str | None = None
    notifiers_n: int = 0
    redis_cluster: str = ""  # seed nodes: the servers use this Redis Cluster (--redis-cluster)
    gateways: list[ServerProc] = field(default_factory=list)
    persisters: list[ServerProc] = field(default_factory=list)
    notifiers: list[ServerProc] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return self.storage == "embedded"

    @property
    def table(self) -> str:
        return f"{self.prefix}_history"

    def _common(self, name: str, notifies: bool = False) -> tuple[list[str], int | None]:
        """The flags every process gets, and its API port (None: no API)."""
        data = self.workdir / name
        data.mkdir(parents=True, exist_ok=True)
        if self.embedded:
            args = ["--storage", "embedded", "--jwt-secret", self.secret, "--data-dir", str(data)]
        else:
            args = [
                "--storage", "production", "--key-prefix", self.prefix,
                "--hbase-table", self.table, "--jwt-secret", self.secret,
                "--queue-partitions", str(self.partitions), "--data-dir", str(data),
                *services.server_flags(),
            ]  # fmt: skip
            if self.redis_cluster:
                args += ["--redis-cluster", self.redis_cluster]
        api_port = None
        if self.settings:
            args += ["--config", str(self.workdir / "server.toml")]
        if self.push_url is not None:
            args += ["--push-gateway", f"{self.push_url}/{name}"]
            if notifies and self.api_key is not None:
                api_port = free_port()
                args += ["--api-listen", f"tcp:{api_port}:interface={HOST}",
                         "--api-key", self.api_key]  # fmt: skip
        return args, api_port

    def start(self) -> None:
        if self.embedded:
            self.gateways_n, self.persisters_n, self.notifiers_n = 1, 0, 0
        if self.settings:
            (self.workdir / "server.toml").write_text(
                "".join(f"{k} = {toml_value(v)}\n" for k, v in sorted(self.settings.items()))
            )
        for i in range(self.gateways_n):
            port = free_port()
            name = "server-0" if self.embedded else f"gateway-{i}"
            common, api = self._common(name, notifies=True)
            args = [*common, "--listen", f"tcp:{port}:interface={HOST}"]
            if not self.embedded:
                args += ["--role", "gateway"]  # id node: leased in Redis
            log = self.workdir / f"{name}.log"
            self.gateways.append(ServerProc(name, "gateway", args, log, port, api))
        for i in range(self.persisters_n):
            common, _ = self._common(f"persister-{i}")
            args = [*common, "--role", "persister"]
            log = self.workdir / f"persister-{i}.log"
            self.persisters.append(ServerProc(f"persister-{i}", "persister", args, log))
        for i in range(self.notifiers_n):
            common, api = self._common(f"notifier-{i}", notifies=True)
            args = [*common, "--role", "notifier"]
            log = self.workdir / f"notifier-{i}.log"
            self.notifiers.append(ServerProc(f"notifier-{i}", "notifier", args, log, None, api))
        # The first process creates the HBase table and declares the queues; the others race
        # it harmlessly, but starting one first keeps start-up logs quiet.
        first, *rest = self.procs
        first.start()
        first.wait_ready()
        for p in rest:
            p.start()
        for p in rest:
            p.wait_ready()

    @property
    def procs(self) -> list[ServerProc]:
        return [*self.persisters, *self.notifiers, *self.gateways]

    @property
    def notifying(self) -> list[ServerProc]:
        """The processes that run a notifier (with --push-gateway, a gateway runs one too)."""
        return [*self.notifiers, *self.gateways] if self.push_url is not None else []

    @property
    def ports(self) -> list[int]:
        return [g.port for g in self.gateways if g.port is not None]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    # --- service data of the run

    def _sqlite_count(self, table: str) -> int:
        """Rows of a table of the embedded server's database (read-only; 0 before it exists)."""
        path = self.workdir / "server-0" / "improto.sqlite3"
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        try:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:  # the table is not created yet
            return 0
        finally:
            db.close()

    def backlog(self) -> int:
        """Persist jobs waiting: ready in the run's queues, or rows of the embedded queue."""
        if self.embedded:
            return self._sqlite_count("jobs")
        return queue_backlog(self.prefix, self.partitions)

    def notify_backlog(self) -> int:
        """Notify jobs waiting (ready in `<prefix>.notify`, or rows of notify_jobs)."""
        if self.embedded:
            return self._sqlite_count("notify_jobs")
        return services.queued_messages([f"{self.prefix}.notify"])

    def dead_letters(self) -> int:
        return 0 if self.embedded else dead_letters(self.prefix)

    def purge(self) -> dict[str, Any]:
        if self.embedded:
            return {"embedded": "the work directory only"}
        out = purge(self.prefix, self.table, self.partitions)
        if self.redis_cluster:
            try:
                out["redis_cluster_keys"] = services.delete_cluster_prefix(self.prefix)
            except Exception as e:
                out["redis_cluster_error"] = repr(e)
        return out


def _services(*args: str) -> str:
    """Run `scripts/services ARGS`; its output, or RuntimeError if it failed."""
    done = subprocess.run(
        [str(SERVICES_SCRIPT), *args], capture_output=True, text=True,
        timeout=SERVICE_CRASH_TIMEOUT_S,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"scripts/services {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout + done.stderr


class Injector(threading.Thread):
    """Injects faults at random moments until stopped, one at a time: a killed process is
    back up before the next fault. `drop_client(rng)` is the harness' hook for client drops: it
    drops or arms a drop and returns its mode (None when no device could be dropped). The
    harness may also ask for a gateway kill at a chosen moment (`request_gateway_kill`).
    `outages` records every kill and service crash: (kind, process or service name, gateway
    port or None, start, end) in time.monotonic(). `spare`: services never crashed (redis,
    rabbitmq, thrift: services shared with other runs, which a crash would disturb)."""

    def __init__(
        self,
        cluster: Cluster,
        drop_client: Callable[[random.Random], str | None],
        rng: random.Random,
        gap_s: tuple[float, float],
        log: Callable[[str], None],
        drop_pushes: Callable[[random.Random], bool] = lambda rng: False,
        spare: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(name="injector", daemon=True)
        self.cluster = cluster
        self.drop_client = drop_client
        self.drop_pushes = drop_pushes
        self.rng = rng
        self.gap_s = gap_s
        self.spare = spare
        self.log = log
        self.requests: queue.Queue[tuple[str, int | None]] = queue.Queue()
        self.stopping = False
        kinds = EMBEDDED_FAULTS if cluster.embedded else FAULTS
        if cluster.redis_cluster:
            kinds = CLUSTER_FAULTS
        if cluster.notifiers:
            kinds = (*kinds, "notifier_kills")
        self.faults: Counter[str] = Counter(dict.fromkeys(kinds, 0))
        self.drop_modes: Counter[str] = Counter()
        self.unexpected_exits: list[str] = []
        self.errors: list[str] = []
        self.events: list[tuple[float, str]] = []
        self.outages: list[tuple[str, str, int | None, float, float]] = []
        self._t0 = time.monotonic()

    def run(self) -> None:
        # Every kind at least once early, then weighted random choices.
        plan = [
            "gateway_kill", "persister_kill", "client_drop", "client_drop", "push_drop",
            "redis_crash", "rabbitmq_crash", "thrift_crash",
        ]  # fmt: skip
        kinds = [
            "client_drop", "push_drop", "gateway_kill", "persister_kill",
            "redis_crash", "rabbitmq_crash", "thrift_crash",
        ]  # fmt: skip
        weights = [5, 2, 2, 2, 1, 1, 1]
        if self.cluster.embedded:  # no persister process, no services
            plan, kinds, weights = plan[:5], kinds[:3], weights[:3]
            plan.remove("persister_kill")
        if self.cluster.redis_cluster:  # the servers' Redis is the cluster: kill its masters
            plan[plan.index("redis_crash")] = "redis_master_kill"
            kinds[kinds.index("redis_crash")] = "redis_master_kill"
        if self.cluster.notifiers:
            plan.append("notifier_kill")
            kinds.append("notifier_kill")
            weights.append(1)
        for name in self.spare:
            if f"{name}_crash" in kinds:
                plan.remove(f"{name}_crash")
                i = kinds.index(f"{name}_crash")
                del kinds[i], weights[i]
        self.rng.shuffle(plan)
        while True:
            try:
                kind, port = self.requests.get(timeout=self.rng.uniform(*self.gap_s))
            except queue.Empty:
                kind, port = (plan.pop(0) if plan else self.rng.choices(kinds, weights)[0]), None
            if kind == "stop":
                return
            try:
                self.check_exits()
                if kind == "gateway_kill":
                    self.gateway_kill(port)
                elif kind == "persister_kill":
                    self.persister_kill()
                elif kind == "notifier_kill":
                    self._kill_restart(self.rng.choice(self.cluster.notifiers), "notifier_kills",
                                       (0.3, 3.0))  # fmt: skip
                elif kind == "push_drop":
                    if self.drop_pushes(self.rng):
                        self.faults["push_drops"] += 1
                elif kind == "redis_master_kill":
                    self.redis_master_kill()
                elif kind.endswith("_crash"):
                    self.service_crash(kind.removesuffix("_crash"))
                else:
                    self.client_drop()
            except Exception as e:  # a restart that failed: stop injecting, report it
                self.errors.append(f"{kind}: {e}")
                self.log(f"fault {kind} failed: {e}")
                return

    def event(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self._t0, 2), what))
        self.log(what)

    def request_gateway_kill(self, port: int) -> None:
        """Kill the gateway on `port` as soon as possible (e.g. in the middle of a burst)."""
        if not self.stopping:
            self.requests.put(("gateway_kill", port))

    def client_drop(self) -> None:
        mode = self.drop_client(self.rng)
        if mode is not None:
            self.drop_modes[mode] += 1  # counted in faults when the device actually drops

    def gateway_kill(self, port: int | None = None) -> None:
        chosen = [g for g in self.cluster.gateways if g.port == port]
        p = chosen[0] if chosen else self.rng.choice(self.cluster.gateways)
        self._kill_restart(p, "gateway_kills", (0.2, 1.5))

    def persister_kill(self) -> None:
        self._kill_restart(self.rng.choice(self.cluster.persisters), "persister_kills", (0.3, 3.0))

    def service_crash(self, name: str) -> None:
        """kill -9 a backing service and start it again (scripts/services crash NAME)."""
        self.event(f"kill -9 {name} (service)")
        t0 = time.monotonic()
        _services("crash", name)
        self.faults[f"{name}_crashes"] += 1
        self.outages.append((f"{name}_crash", name, None, t0, time.monotonic()))
        self.event(f"{name} back after {time.monotonic() - t0:.1f} s")

    def redis_master_kill(self) -> None:
        """kill -9 a master of the Redis Cluster, wait for its replica's promotion, then bring
        the killed node back (it rejoins as a replica)."""
        self.event("kill -9 a Redis Cluster master")
        t0 = time.monotonic()
        said = _services("redis-cluster-kill-master")
        found = re.search(r"killed master 127\.0\.0\.1:(\d+)", said)
        if found is None:
            raise RuntimeError(f"redis-cluster-kill-master said: {said}")
        port = found.group(1)
        promoted = time.monotonic() - t0
        self.faults["redis_master_kills"] += 1
        self.outages.append(("redis_master_kill", f"redis:{port}", None, t0, time.monotonic()))
        self.event(f"Redis master {port} killed, cluster ok again after {promoted:.1f} s")
        time.sleep(self.rng.uniform(0.5, 3.0))
        _services("redis-cluster-restart", port)
        self.event(f"Redis node {port} rejoined as a replica")

    def _kill_restart(self, p: ServerProc, counter: str, down_s: tuple[float, float]) -> None:
        if not p.alive:
            return
        t0 = time.monotonic()
        p.kill9()
        self.faults[counter] += 1
        down = self.rng.uniform(*down_s)
        self.event(f"kill -9 {p.name} (pid {p.proc.pid if p.proc else '?'}), down {down:.1f} s")
        time.sleep(down)
        p.start()
        p.wait_ready()
        self.outages.append((counter.removesuffix("s"), p.name, p.port, t0, time.monotonic()))
        self.event(f"{p.name} restarted (pid {p.proc.pid if p.proc else '?'})")

    def check_exits(self) -> None:
        """A process that died without being killed here: record it and restart it."""
        for p in self.cluster.procs:
            if p.proc is not None and not p.alive:
                code = p.proc.returncode
                self.unexpected_exits.append(f"{p.name} exited {code}")
                self.event(f"{p.name} exited by itself ({code}); restarting:\n{p.log_tail(10)}")
                t0 = time.monotonic()
                p.start()
                p.wait_ready()
                self.outages.append(("exit", p.name, p.port, t0, time.monotonic()))

    def stop(self) -> None:
        """Finish the fault in progress (its process restarted), then stop."""
        self.stopping = True
        self.requests.put(("stop", None))
        self.join()
        self.check_exits()


def toml_value(v: object) -> str:
    """A TOML scalar (the settings are numbers, booleans and plain strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------- service data


def delete_redis_prefix(prefix: str) -> int:
    """SCAN + DEL of `prefix:*` only (the prefix is alphanumeric: no glob escaping needed)."""
    if not prefix.isalnum():
        raise ValueError("refusing a non-alphanumeric prefix")
    return services.delete_redis_prefix(prefix)


def queue_backlog(prefix: str, partitions: int) -> int:
    """Ready jobs in the run's persist queues (deliveries being written not included)."""
    return services.queued_messages([f"{prefix}.persist.{i}" for i in range(partitions)])


def dead_letters(prefix: str) -> int:
    """Jobs the persisters could not decode (dead-lettered): should stay 0."""
    return services.queued_messages([f"{prefix}.persist.dead"])


def purge(prefix: str, table: str, partitions: int) -> dict[str, Any]:
    """Delete the run's Redis keys, queues, exchanges and HBase table (best effort each)."""
    if not prefix.isalnum():
        raise ValueError("refusing a non-alphanumeric prefix")
    return services.purge(prefix, table, partitions)
