"""The exceptions of the client library: server refusals, a closed session, no connection."""

from __future__ import annotations

import re

from improto.enums import CloseReason
from improto.errors import FATAL_CODES, ErrorCode

# PROTOCOL.md 9.4: the text starts with `retry_after_ms=N`, then a space or nothing.
_RETRY_AFTER = re.compile(r"retry_after_ms=([0-9]+)(?: |\Z)")


def parse_retry_after_ms(text: str) -> int | None:
    """The N of a text starting `retry_after_ms=N` (N ≥ 1, decimal), else None."""
    m = _RETRY_AFTER.match(text)
    n = int(m.group(1)) if m else 0  # texts are at most 1024 bytes, within int()'s digits
    return n if n >= 1 else None


class ServerError(Exception):
    """An ERROR frame answering a request (or unsolicited, request_id 0)."""

    def __init__(self, code: int, text: str = "", request_id: int = 0) -> None:
        self.code = code
        self.text = text
        self.request_id = request_id
        super().__init__(f"{self.name} ({code}): {text}" if text else f"{self.name} ({code})")

    @property
    def name(self) -> str:
        """The code's name; an unknown code is named by its hundred (section 13.2)."""
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"{self.code // 100}xx"

    @property
    def fatal(self) -> bool:
        """The server closes the connection after this error (section 13.1)."""
        return self.code in FATAL_CODES

    @property
    def retriable(self) -> bool:
        """5xx: nothing happened, retry later (a SEND with the same client_msg_id)."""
        return self.code // 100 == 5

    @property
    def retry_after_ms(self) -> int | None:
        """RATE_LIMITED: the milliseconds to wait before retrying that the text announces
        (section 9.4); None for other codes or a text without a well-formed value."""
        return parse_retry_after_ms(self.text) if self.code == ErrorCode.RATE_LIMITED else None


class SessionClosed(Exception):
    """The connection ended; `reason` is the CLOSE reason if the server sent one."""

    def __init__(self, reason: int | None = None, text: str = "",
                 error: ServerError | None = None) -> None:  # fmt: skip
        self.reason = reason
        self.text = text
        self.error = error  # the fatal ERROR that ended the session, if any
        super().__init__(f"connection closed: {self.reason_name}" + (f" ({text})" if text else ""))

    @property
    def reason_name(self) -> str | None:
        if self.reason is None:
            return self.error.name if self.error else None
        try:
            return CloseReason(self.reason).name
        except ValueError:
            return f"UNKNOWN_{self.reason}"


class NotConnected(Exception):
    """No logged-in connection; a SEND stays in the outbox and goes out after the next login."""


class StateMismatch(Exception):
    """The ClientState belongs to another user than the token logged in as."""


class FeatureUnavailable(Exception):
    """A post-v1 request on a connection that has not enabled its feature (the server is a
    version-1 server, or the client did not ask for it, or the server turned it off)."""
