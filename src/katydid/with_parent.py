"""Run a command that ends when its parent does: ``python -m katydid.with_parent PID -- CMD...``.

``katydid serve`` starts nats-server in a session of its own (so that Ctrl-C reaches serve
alone, and serve stops NATS last); if serve is SIGKILLed, nothing would stop that nats-server.
Linux's PR_SET_PDEATHSIG does not help here: trio forks from a worker thread, and the signal
follows that thread's exit, not the process's. So this small parent watches instead: it forwards
SIGTERM/SIGINT/SIGHUP to the command, and when the process that started it is gone (it is
reparented) it stops the command (SIGTERM, then SIGKILL after a grace). It exits as the command
did (the same code, or the same signal).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_POLL_S = 0.5
_GRACE_S = 5.0


def run(parent: int, argv: list[str]) -> int:
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            code = child.wait(timeout=_POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:  # our parent died: we were reparented
            child.terminate()
            try:
                code = child.wait(timeout=_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
            break
    if code < 0:  # exit as the command did, so the supervisor can say how it died
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be handled anyway
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
    return code if code >= 0 else 128 - code


def with_parent_argv() -> list[str]:
    """The prefix that makes a command end when this process does (``katydid.with_parent``)."""
    return [sys.executable, "-m", "katydid.with_parent", str(os.getpid()), "--"]


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print("usage: python -m katydid.with_parent PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    return run(int(args[0]), args[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
