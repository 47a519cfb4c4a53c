"""Progress of long loops: a bar where a person watches a terminal, one line at a time in logs.

`Pace` decides when a loop speaks: at its first unit of work (so a run says at once that it is
moving, and how fast), then every `every_s` seconds, and at its end, each time with the rate and an
ETA. A patient pace (`after_s` > 0) stays silent for a stage that ends within `after_s` seconds (a
tiny job's or the demo's alpha evaluation) and speaks, with the same lines, for one that does not (the same
evaluation on 200 rows through 15 recycled blocks). `lines` wraps an iterable with it for logs;
the CLI shows a tqdm bar instead when stderr is a terminal (carryon_cli). Library code takes a
`Progress` and defaults to `quiet`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
Progress = Callable[[Iterable[T], str, "int | None"], Iterable[T]]

log = logging.getLogger("carryon.progress")
EVERY_S = float(os.environ.get("CARRYON_PROGRESS_S", "30"))
# A patient pace's silence: a stage shorter than one progress interval says nothing (the demo's
# general-domain scoring, 15-30 s per epoch on 2 cores, added six lines at 10 s).
AFTER_S = 30.0


def quiet(items: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
    """No progress display: the items as they are."""
    return items


class Pace:
    """When a loop of `total` units (None: unknown) should report: the first unit, then every
    `every_s` seconds, then the last. `due(done)` returns the line to say, or None."""

    def __init__(self, total: int | None, unit: str = "", every_s: float | None = None, start: int = 0,
                 after_s: float = 0.0):
        self.total, self.unit, self.start = total, unit, start  # units done before this pace began
        self.every_s = EVERY_S if every_s is None else every_s
        self.after_s = after_s  # silent until this long has passed; then it speaks as any pace does
        self.t0 = time.monotonic()
        self.last: float | None = None

    def due(self, done: int, force: bool = False) -> str | None:
        now = time.monotonic()
        end = self.total is not None and done >= self.total
        if not force and self.last is None and now - self.t0 < self.after_s:
            return None  # a patient pace's first line waits until the stage has run after_s
        if not (force or end or self.last is None or now - self.last >= self.every_s):
            return None
        self.last = now
        return self.describe(done, now)

    def describe(self, done: int, now: float | None = None) -> str:
        el = (now or time.monotonic()) - self.t0
        rate = (done - self.start) / el if el > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        speed = f"{rate:.2f}/s" if rate < 100 else f"{rate:,.0f}/s"
        if self.total is None:
            return f"{done}{unit} ({speed}, {el:.0f}s)"
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
        return f"{done}/{self.total}{unit} ({speed}, {el:.0f}s elapsed, ETA {eta})"


def lines(items: Iterable[T], desc: str = "", total: int | None = None, every_s: float | None = None,
          logger: logging.Logger = log, after_s: float = 0.0) -> Iterable[T]:
    """The items, logging "desc: done/total (rate, ETA)" at the pace of `Pace` (one line per update;
    `after_s` > 0: nothing for a loop that ends sooner)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    pace = Pace(total, every_s=every_s, after_s=after_s)
    done = 0
    for item in items:
        yield item
        done += 1
        line = pace.due(done)
        if line:
            logger.info("%s: %s", desc or "progress", line)
