"""structlog set-up, done once per process in ``main()``, and a sampled logger for hot events.

Pipeline: contextvars → level filter → UTC timestamp → dict tracebacks → JSON off a TTY (console
renderer on one). Logs go to stderr so stdout stays for results (text, JSON lines).

Rule 1: an event that can repeat at a high rate (a client disconnecting, a rejected frame) goes
through ``SampledLogger``: at most ``burst`` lines per ``window_s`` per event name, and the next
line that does get written carries how many were suppressed. The predecessor died of a log storm.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

# Lines written by this process, by level: the metrics endpoint reports them (a log storm is an
# outage we have had before). Updated by the last processor; read at scrape time.
lines_written: collections.Counter[str] = collections.Counter()
lines_suppressed = 0


def _count(_logger: Any, method: str, event_dict: Any) -> Any:
    lines_written[method] += 1
    return event_dict


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(*, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for this process (call once, from ``main``).

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``json``, ``console``, or ``auto`` (console on a TTY, JSON otherwise).
    """
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    # Tracebacks without their frames' local variables, on a terminal too (rich would show
    # them): a frame parsing a client's message holds the message, API key and prompt included.
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tracebacks: list[structlog.types.Processor] = []
    if not use_console:
        tracebacks.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    processors += [*tracebacks, _count, renderer]
    _route_standard_logging(renderer, tracebacks)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line (PrintLogger writes the line and its newline apart): processes
        # sharing a log (serve's workers, a systemd unit's pipe) never split one another's lines.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _route_standard_logging(
    renderer: structlog.types.Processor, tracebacks: list[structlog.types.Processor]
) -> None:
    """Lines of libraries that log through ``logging`` (hypercorn's "Error in ASGI Framework"
    with its traceback, python-multipart's complaints about a client's form) come out as this
    process's own: one structured line each, sampled per logger (a client can provoke them at
    will), warnings and up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.stdlib.ExtraAdder(allow=["suppressed"]),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tracebacks,
                _count,
                renderer,
            ],
        )
    )
    handler.addFilter(_SampledRecords())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


class _SampledRecords(logging.Filter):
    """At most ``burst`` records per logger and level per ``window_s``; the next one let through
    carries ``suppressed``."""

    def __init__(self, *, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self._sampler = SampledLogger(None, burst=burst, window_s=window_s)

    def filter(self, record: logging.LogRecord) -> bool:
        admitted, suppressed = self._sampler._admit(f"{record.name}:{record.levelno}")
        if admitted and suppressed:
            record.suppressed = suppressed
        return admitted


class SampledLogger:
    """Writes at most ``burst`` lines per event per ``window_s``; counts what it suppresses.

    Args:
        logger: the structlog logger to write through.
        burst: lines allowed per event name per window.
        window_s: window length in seconds.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        logger: Any,
        *,
        burst: int = 5,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[
            str, tuple[float, int, int]
        ] = {}  # event -> (start, written, suppressed)
        self.suppressed_total = 0
        self._levels: dict[str, str] = {}  # key -> level of its last line, for flush()
        # key -> the event and fields its summary line carries (a key other than the event's
        # name: ``sample_as``)
        self._named: dict[str, tuple[str, dict[str, Any]]] = {}

    def _admit(self, event: str) -> tuple[bool, int]:
        now = self._clock()
        with self._lock:
            start, written, suppressed = self._windows.get(event, (now, 0, 0))
            if now - start >= self._window_s:
                start, written = now, 0
            if written < self._burst:
                self._windows[event] = (start, written + 1, 0)
                return True, suppressed
            self._windows[event] = (start, written, suppressed + 1)
            self.suppressed_total += 1
            global lines_suppressed
            lines_suppressed += 1
            return False, 0

    def flush(self) -> int:
        """Report the lines suppressed in windows that have ended (one line per event, with
        ``suppressed: N``), so a burst followed by silence is still counted in the log, not only
        by the next line of that event; returns how many lines it wrote. Call it periodically."""
        now = self._clock()
        with self._lock:
            ended = [
                (event, suppressed)
                for event, (start, _, suppressed) in self._windows.items()
                if suppressed and now - start >= self._window_s
            ]
            for event, _ in ended:
                del self._windows[event]
        for key, suppressed in ended:
            event, fields = self._named.get(key, (key, {}))
            getattr(self._logger, self._levels.get(key, "warning"))(
                event, suppressed=suppressed, summary=True, **fields
            )
        return len(ended)

    def log(
        self,
        level: str,
        event: str,
        *,
        sample_as: tuple[str, dict[str, Any]] | None = None,
        **kw: Any,
    ) -> bool:
        """Log ``event`` at ``level`` if its budget allows; returns whether a line was written.
        ``sample_as``: a budget of its own (a key) and the fields its summary line names, for
        kinds of one event that must not crowd one another out (a session's outcomes)."""
        key = event
        if sample_as is not None:
            key = sample_as[0]
            self._named[key] = (event, sample_as[1])
        self._levels[key] = level
        ok, suppressed = self._admit(key)
        if ok:
            if suppressed:
                kw["suppressed"] = suppressed
            getattr(self._logger, level)(event, **kw)
        return ok

    def info(
        self, event: str, *, sample_as: tuple[str, dict[str, Any]] | None = None, **kw: Any
    ) -> bool:
        return self.log("info", event, sample_as=sample_as, **kw)

    def warning(self, event: str, **kw: Any) -> bool:
        return self.log("warning", event, **kw)
