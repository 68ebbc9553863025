"""Set-up every server process does, the single one or each worker: logging and the interpreter."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys

from app.config import Settings

# Allocations between young-generation collections (CPython's default is 700). Requests in flight keep
# thousands of young objects alive, so at the default every few requests pay for a collection that frees
# little and promotes the survivors, which then cost older, slower collections: 13% of /encode's time.
YOUNG_GENERATION_THRESHOLD = 20_000
# How long a thread may hold the GIL while another waits (CPython's default is 5 ms). The inference threads
# need it briefly around each run; behind a busy event loop each such wait took up to 5 ms, which set
# /encode's p99 (67 ms at 64 connections; 44 ms at 0.5 ms).
GIL_SWITCH_INTERVAL_SECONDS = 0.0005
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def tune_interpreter() -> None:
    """Freeze the start-up heap out of garbage collection, collect less often, and hand the GIL over sooner.

    Memory stays bounded: reference counting frees almost everything, the collector only finds cycles.
    """
    gc.collect()
    gc.freeze()
    _, *older = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *older)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)


def stop_with_parent(parent_pid: int) -> None:
    """Have Linux send this worker SIGTERM (a graceful stop) when its supervisor dies, even by SIGKILL, so
    no orphaned worker keeps serving the port. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
