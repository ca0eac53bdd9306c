"""Child processes that end with their parent.

`make run`, the tests and the benchmarks start Envoy, EPPs, simulated pods, Redis and an API server as
child processes (most in sessions of their own, so that a Ctrl-C in the terminal reaches the parent only, which
stops them in order). A parent killed with SIGKILL, or by the OOM killer, runs no clean-up, and the children
would go on holding their ports; Linux's PR_SET_PDEATHSIG has the kernel send them SIGTERM instead.

The child sets it itself, through a small launcher that then execs the program: a `preexec_fn` would make
CPython fork() instead of vfork(), which runs gRPC's fork handlers in the parent, and those can block for
ever once a gRPC channel has been used (a test run hung so).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence

# argv: parent pid, program, its arguments. PR_SET_PDEATHSIG is 1; a parent gone before the prctl is
# noticed by the pid check (the child was re-parented).
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(args: Sequence[str]) -> list[str]:
    """`args` (a program and its arguments) run so that the child gets SIGTERM when this process dies.
    Unchanged where that cannot hold: not Linux, or not the main thread (the kernel signals when the
    forking *thread* ends, and a worker thread may end long before the process)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return list(args)
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *args]
