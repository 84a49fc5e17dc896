"""The `imserver` command: help, token minting, config precedence, and a TLS listener."""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from improto.codec import FrameReader, decode_payload, encode
from improto.frames import (
    Frame,
    Hello,
    HelloOk,
    Message,
    OfflinePage,
    OfflinePull,
    Send,
    SendAck,
)
from improto.tokens import mint, verify
from improto_server.cli import load_config, run_parser
from improto_server.config import Config
from tests.support.ports import free_port
from tests.support.server import start_server

SERVER = [sys.executable, "-m", "improto_server"]


def test_help_explains_every_option() -> None:
    out = subprocess.run([*SERVER, "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--listen", "--data-dir", "--config", "--jwt-secret", "--node-id",
                   "--heartbeat", "--idle-timeout", "--inbox-retention-days",
                   "--history-retention-days", "--max-unacked-pushes", "token"):  # fmt: skip
        assert option in out, option


def test_token_uses_the_data_dir_secret(tmp_path: Path) -> None:
    out = subprocess.run(
        [*SERVER, "token", "1001", "--device", "phone", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    secret = (tmp_path / "jwt-secret").read_text().strip()
    assert len(secret) == 64
    ident = verify(secret, out, "phone")
    assert (ident.user_id, ident.device_id) == (1001, "phone")


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "improto.toml"
    cfg.write_text('listen = ["tcp:6000"]\nidle_timeout = 42\nheartbeat = 7\n')
    args = run_parser().parse_args(["--config", str(cfg), "--idle-timeout", "9"])
    config = load_config(args)
    assert config.listen == ["tcp:6000"]
    assert (config.idle_timeout, config.heartbeat) == (9, 7)
    assert config.inbox_retention_days == Config().inbox_retention_days


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("idle_timeuot = 5\n")
    with pytest.raises(ValueError, match="idle_timeuot"):
        Config.from_file(cfg)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_listener_serves_the_protocol(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    port = free_port()
    secret = "tls-test-secret-tls-test-secret-0000"
    proc = subprocess.Popen(
        [*SERVER, "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
         "--data-dir", str(tmp_path / "data"), "--jwt-secret", secret],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + 20
        while True:
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(encode(Hello(1, 1, "phone", mint(secret, 5, "phone"), request_id=1)))
            reader, frames = FrameReader(), []
            while not frames:
                frames = reader.feed(tls.recv(4096))
            ok = decode_payload(frames[0])
            assert isinstance(ok, HelloOk) and ok.user_id == 5
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, "SIGTERM should stop the server cleanly"


def _exchange(sock: socket.socket, reader: FrameReader, frame: Frame) -> Frame:
    """Send one request, return the first frame that answers its request_id."""
    sock.sendall(encode(frame))
    while True:
        for payload in reader.feed(sock.recv(65536)):
            reply = decode_payload(payload)
            if reply.request_id == frame.request_id:
                return reply


def _pull_offline(port: int, secret: str, user: int) -> tuple[Message, ...]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = FrameReader()
        ok = _exchange(sock, reader, Hello(1, 0, "d", mint(secret, user, "d"), request_id=1))
        assert isinstance(ok, HelloOk)
        page = _exchange(sock, reader, OfflinePull(0, 200, request_id=2))
        assert isinstance(page, OfflinePage) and not page.has_more
        return page.messages


def test_memory_storage_serves_and_keeps_nothing(tmp_path: Path) -> None:
    """--storage memory: the whole protocol works (persistence off); a restart forgets it all
    and nothing is written to the data directory."""
    secret = "memory-test-secret-memory-test-0000"
    server = start_server(tmp_path, secret, "--storage", "memory")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            reader = FrameReader()
            hello = Hello(1, 0, "d", mint(secret, 5, "d"), request_id=1)
            assert isinstance(_exchange(sock, reader, hello), HelloOk)
            send = Send(b"m" * 16, 1, 6, 1, b"kept in RAM", request_id=2)
            ack = _exchange(sock, reader, send)
            assert isinstance(ack, SendAck) and not ack.duplicate
        deadline = time.monotonic() + 10
        while not (got := _pull_offline(server.port, secret, 6)):
            assert time.monotonic() < deadline, "message never reached the inbox"
            time.sleep(0.05)
        assert [(m.msg_id, m.body) for m in got] == [(ack.msg_id, b"kept in RAM")]
    finally:
        assert server.stop() == 0
    assert not list((tmp_path / "data").glob("*.sqlite3*"))
    server = start_server(tmp_path, secret, "--storage", "memory")
    try:
        assert _pull_offline(server.port, secret, 6) == ()
    finally:
        server.stop()
