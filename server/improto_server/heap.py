"""The collector's view of the long-lived heap.

A full (generation 2) collection walks every tracked object: at start that is the modules,
Twisted, construct's layouts and the backends' clients, all of which live as long as the
process. Walking them stalls the one reactor thread for tens of milliseconds, at random
moments, for every connection at once. Once the server is up, `gc.freeze()` moves them to
the permanent generation, so a full collection walks only what was made since.
"""

from __future__ import annotations

import gc

from twisted.logger import Logger

log = Logger()


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left; returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("{n} startup objects frozen out of the collector's walks", n=frozen)
    return frozen
