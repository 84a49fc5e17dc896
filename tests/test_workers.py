"""`imserver --workers N` (workers.py): option checks, and real processes on one port with
production storage: connections spread over the workers, a message between users on two
workers is pushed live and stored, a killed worker comes back, SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from improto.conformance.conn import Conn, eventually, new_device, new_user, sync
from improto.frames import HistoryPage, HistoryPull
from improto_server.cli import load_config, run_parser
from improto_server.config import Config
from improto_server.ids import NODE_BITS, SEQ_BITS
from improto_server.workers import address, child_config, shift_port
from tests.support.ports import LOOPBACK
from tests.support.server import ServerHandle, start_improto
from tests.support.services import needs
from tests.test_server_cli import _self_signed

SECRET = "workers-test-secret-0123456789abcdef0123456789"
API_KEY = "workers-test-api-key-0123456789"
SERVER = [sys.executable, "-m", "improto_server"]


# ---------------------------------------------------------------- settings


def prod(**kw: object) -> Config:
    return Config().merged({"storage": "production", **kw})


@pytest.mark.parametrize("bad", [0, -1, 257, True, 2.0, "2"])
def test_workers_must_be_an_integer_in_range(bad: object) -> None:
    with pytest.raises(ValueError, match=r"workers must be an integer in 1\.\.256"):
        prod(workers=bad).check()


@pytest.mark.parametrize("storage", ["embedded", "memory"])
def test_workers_need_production_storage(storage: str) -> None:
    Config(storage=storage, workers=1).check()
    with pytest.raises(ValueError, match="workers = 2 needs storage = production"):
        Config(storage=storage, workers=2).check()


@pytest.mark.parametrize("role", ["persister", "notifier"])
def test_workers_are_gateways_only(role: str) -> None:
    with pytest.raises(ValueError, match="workers applies to gateway processes"):
        prod(workers=2, role=role, push_gateway="http://127.0.0.1:1/").check()


def test_workers_share_tcp_listeners_only() -> None:
    prod(workers=2, listen=["tcp:5555", "tcp6:5556:interface=\\:\\:1"]).check()
    with pytest.raises(ValueError, match="tcp, tcp6 or ssl listeners only"):
        prod(workers=2, listen=["unix:/tmp/im.sock"]).check()


def test_node_ids_and_api_ports_of_every_worker_must_exist() -> None:
    prod(workers=4, node_id=1020).check()
    with pytest.raises(ValueError, match="node_id 1021 \\+ workers 4"):
        prod(workers=4, node_id=1021).check()
    # ports of workers 0..3, the persister, the notifier
    prod(workers=4, api_key=API_KEY, api_listen="tcp:65530").check()
    with pytest.raises(ValueError, match="above 65535"):
        prod(workers=4, api_key=API_KEY, api_listen="tcp:65531").check()
    prod(workers=4, api_listen="tcp:65535").check()  # no API key: no API listener


def test_flag_and_config_file(tmp_path: Path) -> None:
    assert load_config(run_parser().parse_args([])).workers == 1
    cfg = tmp_path / "w.toml"
    cfg.write_text('storage = "production"\nworkers = 3\n')
    assert load_config(run_parser().parse_args(["--config", str(cfg)])).workers == 3
    args = run_parser().parse_args(["--config", str(cfg), "--workers", "2"])
    assert load_config(args).workers == 2


def test_shift_port() -> None:
    assert shift_port("tcp:5580:interface=127.0.0.1", 2) == "tcp:5582:interface=127.0.0.1"
    assert shift_port("tcp:port=5580:interface=\\:\\:1", 1) == "tcp:port=5581:interface=\\:\\:1"
    assert shift_port("tcp:0", 3) == "tcp:0"  # each process its own ephemeral port
    assert shift_port("tcp:5580", 0) == "tcp:5580"
    with pytest.raises(ValueError, match="not a tcp"):
        shift_port("unix:/tmp/api.sock", 1)
    with pytest.raises(ValueError, match="no port"):
        shift_port("tcp:interface=127.0.0.1", 1)


def test_each_child_gets_its_own_identity_and_api_port() -> None:
    base = prod(workers=2, gateway_id="gw", node_id=10, api_key=API_KEY, api_listen="tcp:7000")
    w1 = child_config(base, "gateway", 1)
    assert (w1.workers, w1.role, w1.gateway_id, w1.node_id, w1.api_listen) == (
        1, "gateway", "gw-1", 11, "tcp:7001",
    )  # fmt: skip
    w1.check()
    persister, notifier = child_config(base, "persister", 0), child_config(base, "notifier", 0)
    assert (persister.role, persister.api_listen) == ("persister", "tcp:7002")
    assert (notifier.role, notifier.api_listen) == ("notifier", "tcp:7003")
    anonymous = child_config(prod(workers=2), "gateway", 1)
    assert (anonymous.gateway_id, anonymous.node_id) == (None, None)  # random id, leased node


def test_workers_with_embedded_storage_are_refused_at_start(tmp_path: Path) -> None:
    out = subprocess.run(
        [*SERVER, "--workers", "2", "--data-dir", str(tmp_path), "--jwt-secret", SECRET],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert "workers = 2 needs storage = production" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_listen_addresses(tmp_path: Path) -> None:
    a = address("tcp:5555:interface=127.0.0.1", 1024)
    assert (a.family, a.host, a.port, a.backlog, a.tls) == (
        socket.AF_INET, "127.0.0.1", 5555, 1024, None,
    )  # fmt: skip
    assert address("tcp:5555:backlog=10", 1024).backlog == 10  # its own backlog wins
    assert address("tcp:5555", 1).host == ""  # every IPv4 interface
    v6 = address("tcp6:5555:interface=\\:\\:1", 1)
    assert (v6.family, v6.host) == (socket.AF_INET6, "::1")
    key, cert = _self_signed(tmp_path)
    tls = address(f"ssl:5556:interface=127.0.0.1:privateKey={key}:certKey={cert}", 1)
    assert tls.tls is not None and tls.port == 5556


def test_a_busy_port_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    """Production settings, but no service is touched: the supervisor checks the port first."""
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [*SERVER, "--workers", "2", "--storage", "production", "--jwt-secret", SECRET,
             "--listen", f"tcp:{port}:interface={LOOPBACK}", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1, out
    assert "cannot listen on" in out.stderr and "started worker" not in out.stderr


# ---------------------------------------------------------------- real processes


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def api_ports(n: int) -> int:
    """A base port with n free ports from it (workers' API ports are base + i)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            base = int(s.getsockname()[1])
        if base + n > 65_535:
            continue
        try:
            for port in range(base + 1, base + n):
                with socket.socket() as t:
                    t.bind((LOOPBACK, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


class Workers:
    def __init__(self, handle: ServerHandle, api: int) -> None:
        self.handle, self.api = handle, api

    def wait_ready(self, n: int, timeout: float = 30.0) -> None:
        """Until the supervisor has logged its `n` children ready."""
        eventually(lambda: self.log_has(f"all {n} processes ready"), timeout)

    def log_has(self, text: str) -> None:
        assert self.handle.log is not None
        assert text in self.handle.log.read_text(errors="replace"), text

    def gateways(self) -> list[int]:
        """The pids of the processes listening on the port (the gateway workers)."""
        found = []
        for pid in children(self.handle.pid):
            if _inodes(pid) & _listen_inodes(self.handle.port):
                found.append(pid)
        return sorted(found)

    def owner(self, conn: Conn) -> int:
        """Which worker holds the server side of this connection."""
        client_port = conn.sock.getsockname()[1]

        def find() -> int:
            inode = _established_inode(self.handle.port, client_port)
            assert inode, "not accepted yet"
            for pid in children(self.handle.pid):
                if inode in _inodes(pid):
                    return pid
            raise AssertionError("no worker holds it")

        return eventually(find, 10.0)

    def login(self, user: int, on: int | None = None) -> Conn:
        """A logged-in connection of `user`, on worker pid `on` if given (reconnecting until
        the kernel's hash puts it there)."""
        for _ in range(200):
            c = Conn(LOOPBACK, self.handle.port, 10.0)
            if on is None or self.owner(c) == on:
                c.login(SECRET, user, new_device())
                return c
            c.close()
        raise AssertionError(f"200 connections, none on worker {on}")

    def metric(self, index: int, name: str) -> float:
        url = f"http://{LOOPBACK}:{self.api + index}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name))  # fmt: skip


def _inodes(pid: int) -> set[int]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    except OSError:
        pass
    return out


def _tcp_rows() -> Iterator[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        yield int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16), f[3], int(f[9])


def _listen_inodes(port: int) -> set[int]:
    return {inode for lp, _, state, inode in _tcp_rows() if lp == port and state == "0A"}


def _established_inode(server_port: int, client_port: int) -> int:
    for lp, rp, state, inode in _tcp_rows():
        if lp == server_port and rp == client_port and state == "01" and inode:
            return inode
    return 0


def start_workers(n: int, workdir: Path | None = None) -> Workers:
    api = api_ports(n + 1)
    handle = start_improto(
        "--workers", str(n), "--api-key", API_KEY,
        "--api-listen", f"tcp:{api}:interface={LOOPBACK}",
        storage="production", secret=SECRET, workdir=workdir,
    )  # fmt: skip
    w = Workers(handle, api)
    w.wait_ready(n + 1)
    return w


@pytest.fixture(scope="module")
@needs()
def workers() -> Iterator[Workers]:
    w = start_workers(2)
    try:
        yield w
    finally:
        w.handle.stop()


def test_connections_land_on_both_workers(workers: Workers) -> None:
    gateways = workers.gateways()
    assert len(gateways) == 2, gateways
    conns = [workers.login(new_user()) for _ in range(24)]  # all on one: p = 2^-23
    try:
        owners = {workers.owner(c) for c in conns}
        assert owners == set(gateways)
        online = [workers.metric(i, 'improto_connections{state="online"}') for i in (0, 1)]
        assert all(n >= 1 for n in online) and sum(online) >= len(conns), online
    finally:
        for c in conns:
            c.close()


def node_of(msg_id: int) -> int:
    return (msg_id >> SEQ_BITS) & ((1 << NODE_BITS) - 1)


def test_a_message_between_workers_is_pushed_and_stored(workers: Workers) -> None:
    w0, w1 = workers.gateways()
    alice, bob = new_user(), new_user()
    a = workers.login(alice, on=w0)
    b = workers.login(bob, on=w1)
    try:
        t = time.monotonic()
        ack = a.send_msg(bob, b"across workers")
        assert b.push_for(ack.msg_id, timeout=5.0).body == b"across workers"
        assert time.monotonic() - t < 2.0  # live, not a later sync
        back = b.send_msg(alice, b"and back")
        assert a.push_for(back.msg_id, timeout=5.0).body == b"and back"
        assert node_of(ack.msg_id) != node_of(back.msg_id)  # each worker its own id node

        def stored() -> None:
            page = a.call(HistoryPull(1, bob, 0, 10), HistoryPage)
            assert [m.msg_id for m in page.messages] == [back.msg_id, ack.msg_id]
            other = workers.login(bob)  # a second device of bob's, on either worker
            try:
                assert ack.msg_id in [m.msg_id for m in sync(other).messages]
            finally:
                other.close()

        eventually(stored, 20.0)
    finally:
        a.close()
        b.close()


def test_a_killed_worker_is_restarted(workers: Workers) -> None:
    before = workers.gateways()
    os.kill(before[1], signal.SIGKILL)
    eventually(lambda: workers.log_has("worker 1 exited with -9"), 10.0)

    def replaced() -> list[int]:
        now = workers.gateways()
        assert len(now) == 2 and before[0] in now and before[1] not in now, now
        return now

    now = eventually(replaced, 30.0)
    (new,) = set(now) - {before[0]}
    eventually(lambda: workers.log_has(f"worker 1 ready (pid {new})"), 30.0)
    conns = [workers.login(new_user()) for _ in range(16)]
    try:
        assert {workers.owner(c) for c in conns} == set(now)
    finally:
        for c in conns:
            c.close()


@pytest.mark.services()
def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    w = start_workers(2, workdir=tmp_path)  # kept: its log is read after the stop
    kids = children(w.handle.pid)
    assert len(kids) == 3  # two workers, one persister
    c = w.login(new_user())
    assert w.handle.stop() == 0
    assert c.closed_within(5.0)
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid
    log = w.handle.log_tail(60)
    assert "stopped" in log and "worker 0 exited (0)" in log and "persister exited (0)" in log


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
