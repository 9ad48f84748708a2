"""Processes: whether one is alive, and children that do not outlive their parent.

A stage runs under dvc, which may run under the Prefect flow; a stage may start workers of
its own (fastText's trainer). When any of them is killed, what it started must stop too:
`die_with_parent()` asks Linux to send SIGTERM to the calling process when its parent dies
(PR_SET_PDEATHSIG); stages turn SIGTERM into a clean stop (run marked KILLED, temporaries
removed). `alive(pid)` lets the next run clean what a SIGKILL left behind.
"""

from __future__ import annotations

import os
import signal
import sys


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def die_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass
