"""Black-box protocol conformance suite for improto v1 servers (spec/PROTOCOL.md).

Run it with `python -m improto.conformance --server HOST:PORT --jwt-secret S`; use
`improto.conformance.runner.run` to run it from Python.
"""

from improto.conformance.runner import REGISTRY, Report, check, load_checks, main, run

__all__ = ["REGISTRY", "Report", "check", "load_checks", "main", "run"]
