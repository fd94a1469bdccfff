"""A JSON-lines log of every swap, eviction and engine failure (one object per line, appended).

An observer of the scheduler, like the metrics: ``swap_recorded`` and ``engine_failed``. Lines are
written whole with one ``write`` on a file opened for appending, so a killed server leaves at most
a missing last line, never a torn one in the middle; readers skip a line that does not parse."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import swap_event, swap_path

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # kept open: one write per event

    def write(self, event: str, model: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 6), "event": event, "model": model, **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
            except (OSError, ValueError) as exc:  # disk full, closed: the service goes on, the log says why
                log.warning("event log %s: %s", self.path, exc)

    # ---- the scheduler's observer interface ------------------------------------------------
    def swap_recorded(self, model: str, what: str, timings: Sequence[Any]) -> None:
        """``timings``: the swap's steps (``.step``, ``.seconds``, ``.ok``; SwapSteps.timings)."""
        direction, ok, reason = swap_event(what)
        seconds = sum(t.seconds for t in timings)
        fields: dict[str, Any] = {
            "direction": direction, "ok": ok, "path": swap_path(t.step for t in timings), "seconds": round(seconds, 6),
            "steps": [{"step": t.step, "seconds": round(t.seconds, 6), "ok": t.ok} for t in timings]}
        if reason:
            fields["reason"] = reason
        if not ok:
            fields["outcome"] = what.rsplit(" ", 1)[-1]  # failed / cancelled
        self.write("swap", model, **fields)
        if ok and reason and reason.startswith("preempted"):
            self.write("eviction", model, requester=reason.removeprefix("preempted for ").strip(),
                       seconds=round(seconds, 6))

    def engine_failed(self, model: str, reason: str) -> None:
        self.write("failure", model, reason=reason)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every whole event in the log (a torn last line is skipped)."""
    events = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
