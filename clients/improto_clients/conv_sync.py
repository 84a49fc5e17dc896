"""Fetching the conversation list (PROTOCOL.md section 18): CONV_LIST pages, then
CONV_CHANGES from the first page's version; later only CONV_CHANGES from the stored version."""

from __future__ import annotations

from dataclasses import dataclass, field

from improto.frames import ConvChanges, ConvChangesPage, ConvList, ConvPage
from improto_clients.protocol import IMClientProtocol
from improto_clients.state import ClientState


@dataclass
class ConvResult:
    """One fetch: the keys whose row changed (in page order), pages read, where it ended."""

    changed: list[str] = field(default_factory=list)
    pages: int = 0
    version: int = 0  # the list version now stored
    total_unread: int = 0


async def fetch_list(
    proto: IMClientProtocol,
    state: ClientState,
    limit: int,
    timeout: float,
    max_pages: int | None = None,
) -> ConvResult:
    """The list newest activity first (up to max_pages pages), then the changes made while it
    was paged. The version is stored only once the list is read: an interrupted fetch starts
    again instead of claiming rows it never saw."""
    result = ConvResult()
    before, first_version = 0, None
    while True:
        page = await proto.call(ConvList(before, limit), ConvPage, timeout)
        if first_version is None:
            first_version = page.list_version
        result.changed += state.convs.apply_page(page.total_unread, page.convs)
        result.pages += 1
        tail = page.convs[-1].last if page.convs else ()
        # Rows without a message come last and have no msg_id to page by; they count
        # nothing unread, so the list is complete for the badge all the same.
        if not page.has_more or not tail:
            state.convs.mark_complete()
            break
        if max_pages and result.pages >= max_pages:
            break
        before = tail[0].msg_id
    return await fetch_changes(proto, state, first_version, limit, timeout, result)


async def fetch_changes(
    proto: IMClientProtocol,
    state: ClientState,
    since: int,
    limit: int,
    timeout: float,
    result: ConvResult | None = None,
) -> ConvResult:
    """CONV_CHANGES pages until has_more = 0, storing each page's version after its rows (as
    the offline cursor: even when it is lower than what was sent, lost server data)."""
    result = result if result is not None else ConvResult()
    from_start = since == 0  # every row, hidden ones too: the whole list
    while True:
        page = await proto.call(ConvChanges(since, limit), ConvChangesPage, timeout)
        result.changed += state.convs.apply_page(page.total_unread, page.convs)
        result.pages += 1
        since = state.convs.version = page.list_version
        state.save()
        if not page.has_more:
            break
    if from_start:
        state.convs.mark_complete()
    result.version, result.total_unread = since, state.convs.total_unread
    return result
