"""Compile stages: one progress line per stage with its time and peak memory, and the report's per-stage record.

    stages = Stages(log)
    with stages("load", "bf16 checkpoint, memory-mapped"):
        ...
    stages.record()  ->  {"stages": [{"name", "seconds", "peak_rss_bytes", "rss_bytes"}], "peak_rss_bytes": ...}

Peak RSS is the process's high-water mark (resource.getrusage ru_maxrss), read when each stage ends, so a
stage's figure is the peak of the compile so far. `progress(items, desc)` wraps a long loop in a tqdm bar when
stderr is a terminal, and is the plain iterable otherwise (logs, tests, CI).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import asdict, dataclass

__all__ = ["Stages", "StageRecord", "peak_rss_bytes", "rss_bytes", "progress"]


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes (getrusage; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int | None:
    """The current resident set size in bytes (Linux /proc/self/statm; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            import os
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class StageRecord:
    """One finished stage: wall seconds, peak RSS of the process at its end, RSS at its end."""
    name: str
    seconds: float
    peak_rss_bytes: int
    rss_bytes: int | None
    detail: str = ""


class Stages:
    """Times named stages; logs one line per stage ("load: 3.1 s, peak RSS 1.20 GiB (bf16 ...)")."""

    def __init__(self, log=None):
        self.log = log or (lambda msg: None)
        self.records: list[StageRecord] = []
        self.t0 = time.perf_counter()

        self._open: tuple[str, str, float] | None = None

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str = ""):
        self.begin(name, detail)
        yield
        self.end()

    def begin(self, name: str, detail: str = "") -> None:
        """Start stage `name` (ends the open one first)."""
        if self._open:
            self.end()
        self._open = (name, detail, time.perf_counter())

    def cancel(self) -> None:
        """Drop the open stage without recording or logging it (it had nothing to do)."""
        self._open = None

    def end(self) -> StageRecord | None:
        """End the open stage: record it and log its one line."""
        if not self._open:
            return None
        name, detail, t = self._open
        self._open = None
        rec = StageRecord(name, round(time.perf_counter() - t, 2), peak_rss_bytes(), rss_bytes(), detail)
        self.records.append(rec)
        self.log(f"{name}: {rec.seconds:.1f} s, peak RSS {rec.peak_rss_bytes / 2**30:.2f} GiB"
                 + (f" ({detail})" if detail else ""))
        return rec

    def seconds(self, name: str) -> float:
        """Total seconds of the stages called `name` (0 if none ran)."""
        return round(sum(r.seconds for r in self.records if r.name == name), 2)

    def record(self) -> dict:
        """The report's view: every stage in order, the total wall time and the process's peak RSS."""
        return {"stages": [asdict(r) for r in self.records], "total_seconds": round(time.perf_counter() - self.t0, 2),
                "peak_rss_bytes": peak_rss_bytes()}


def progress(items, desc: str, total: int | None = None, min_items: int = 8):
    """`items` wrapped in a tqdm bar on a terminal (stderr is a tty and there are at least `min_items`)."""
    n = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if not sys.stderr.isatty() or (n is not None and n < min_items):
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=n, leave=False, unit="it", file=sys.stderr)
