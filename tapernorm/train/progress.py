"""Training progress: a tqdm bar on a terminal, and periodic flushed lines when stderr is a file or a pipe
(CI logs, `nohup`, `2> log`), so a run is never silent there and never fills a log with carriage returns."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """`update(done, **fields)` after each step; `close()` at the end. `every`: steps between lines (default: a
    line per 5% of the run, and at least one every 30 s)."""

    def __init__(self, total: int, start: int, enabled: bool, stream=None, every: int | None = None,
                 desc: str = "train", interval_s: float = 30.0):
        from tqdm.auto import tqdm
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.start, self.desc = total, start, desc
        self.lines = enabled and not tty
        self.every = every or max(1, total // 20)
        self.interval_s = interval_s
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, initial=start, disable=not (enabled and tty), desc=desc, unit="step",
                        file=self.stream)

    def update(self, done: int, **fields) -> None:
        """One step finished (`done` steps in all); `fields` are shown (floats with 4 significant digits)."""
        self.bar.update(1)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        self.bar.set_postfix(shown, refresh=False)
        now = time.perf_counter()
        if not self.lines or not (done % self.every == 0 or done == self.total or now - self.last >= self.interval_s):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        print(f"[{self.desc}] step {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) "
              + " ".join(f"{k} {v}" for k, v in shown.items())
              + f" | {rate:.2f} steps/s, eta {eta:.0f} s", file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
