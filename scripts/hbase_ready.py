#!/usr/bin/env python3
"""Readiness check for the HBase Thrift1 gateway, used by scripts/services.

Proves more than an open port: through happybase (default buffered transport, binary protocol)
it creates a table if missing, puts a row, reads it back and deletes it again. Retries until the
deadline, then exits 1 with the last error.

    scripts/hbase_ready.py [--host 127.0.0.1] [--port 9090] [--timeout 180] [--table services_ready]
"""

import argparse
import sys
import time


def round_trip(host, port, table_name, call_timeout_ms):
    import happybase

    conn = happybase.Connection(host, port, timeout=call_timeout_ms)
    try:
        if table_name.encode() not in conn.tables():
            try:
                conn.create_table(table_name, {"f": {"max_versions": 1}})
            except Exception as exc:  # AlreadyExists when two checks race
                if "AlreadyExists" not in repr(exc) and "TableExistsException" not in repr(exc):
                    raise
        table = conn.table(table_name)
        row, value = b"ping", str(time.time()).encode()
        table.put(row, {b"f:c": value})
        got = table.row(row).get(b"f:c")
        if got != value:
            raise RuntimeError(f"read back {got!r}, expected {value!r}")
        table.delete(row)
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--timeout", type=float, default=180.0, help="overall deadline, seconds")
    ap.add_argument("--table", default="services_ready")
    args = ap.parse_args()

    try:
        import happybase  # noqa: F401
    except ImportError:
        print(
            f"hbase_ready: happybase is not importable by {sys.executable} "
            "(run scripts/bootstrap.sh)"
        )
        return 2

    start = time.monotonic()
    deadline = start + args.timeout
    last, tries = None, 0
    while True:
        tries += 1
        remaining = deadline - time.monotonic()
        try:
            # per-call socket timeout in ms: long enough for a first region assignment
            round_trip(args.host, args.port, args.table, int(max(5.0, min(30.0, remaining)) * 1000))
            print(
                f"hbase_ready: put/get round trip OK on {args.host}:{args.port} after "
                f"{time.monotonic() - start:.1f} s ({tries} tries)"
            )
            return 0
        except (
            Exception
        ) as exc:  # TTransportException, IOError(PleaseHoldException), socket errors...
            last = exc
        if time.monotonic() + 1 >= deadline:
            break
        time.sleep(1)
    print(f"hbase_ready: NOT ready after {args.timeout:.0f} s ({tries} tries): {last!r}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
