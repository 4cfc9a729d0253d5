"""Progress of a long step, in the style of train.py's iteration line:

    leakage candidates: 1200/4000 (30%) | 41.3/s | eta 1m08s | cheaper: --n_candidates

Lines go to stderr (stdout keeps the tables and results), at most one every `interval` seconds plus
the first and the last, so a fast step prints two lines and a slow one a line every few seconds."""
import sys
import time


def format_eta(seconds):
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Counts done/total for `label`; `hint` names the flag that makes the step cheaper."""

    def __init__(self, label, total, hint="", interval=5.0, stream=None, clock=time.monotonic):
        self.label, self.total, self.hint, self.interval = label, max(0, int(total)), hint, interval
        self.stream, self.clock = stream, clock
        self.done, self.start = 0, clock()
        self.last_print = None
        self.print_line()

    def line(self):
        elapsed = self.clock() - self.start
        parts = [f"{self.label}: {self.done}/{self.total}"
                 + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            parts.append(f"{rate:.3g}/s")
            parts.append(f"eta {format_eta((self.total - self.done) / rate)}")
        else:
            parts.append("eta ?")
        if self.hint and self.done < self.total:
            parts.append(f"cheaper: {self.hint}")
        return " | ".join(parts)

    def print_line(self):
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self.last_print = self.clock()

    def update(self, n=1):
        was_done = self.done >= self.total
        self.done = min(self.total, self.done + n)
        if (self.done >= self.total and not was_done) or self.clock() - self.last_print >= self.interval:
            self.print_line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
