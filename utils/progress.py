"""Progress of a long step, in the style of train.py's iteration line:

    leakage candidates: 1200/4000 (30%) | 41.3/s | eta 1m08s | cheaper: --n_candidates

Lines go to stderr (stdout keeps the tables and results). A step that ends within INTERVAL seconds
prints nothing; a longer one prints a line every INTERVAL seconds and a last one when it is done, each
naming the flag that makes the step cheaper. Tests set INTERVAL = 0 to see every line."""
import sys
import time

INTERVAL = 5.0  # seconds between lines (and before the first)


def format_eta(seconds):
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Counts done/total for `label`; `hint` names the flag that makes the step cheaper."""

    def __init__(self, label, total, hint="", interval=None, stream=None, clock=time.monotonic):
        self.label, self.total, self.hint = label, max(0, int(total)), hint
        self.interval = INTERVAL if interval is None else interval
        self.stream, self.clock = stream, clock
        self.done, self.start = 0, clock()
        self.last_print, self.printed = self.start, 0

    def line(self):
        elapsed = self.clock() - self.start
        parts = [f"{self.label}: {self.done}/{self.total}"
                 + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            parts += [f"{rate:.3g}/s", f"eta {format_eta((self.total - self.done) / rate)}"]
        else:
            parts.append("eta ?")
        if self.hint:
            parts.append(f"cheaper: {self.hint}")
        return " | ".join(parts)

    def print_line(self):
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self.last_print, self.printed = self.clock(), self.printed + 1

    def update(self, n=1):
        was_done = self.done >= self.total
        self.done = min(self.total, self.done + n)
        now = self.clock()
        if self.done >= self.total and not was_done:
            if self.printed or now - self.start >= self.interval:
                self.print_line()  # the last line, only for a step that was long enough to report on
        elif now - self.last_print >= self.interval:
            self.print_line()

    def track(self, iterable):
        """Yield from iterable, counting one per item."""
        for item in iterable:
            yield item
            self.update()


def batched(fn, items, batch_size, progress, key=None):
    """fn(batch) -> one output per item, called on consecutive batches of `items` (sorted by `key` first,
    e.g. prompt length, so a batch pads little), counting each batch in `progress`. Returns the outputs
    in the order of `items`."""
    order = sorted(range(len(items)), key=(lambda i: key(items[i])) if key else None)
    out = [None] * len(items)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, result in zip(rows, fn([items[i] for i in rows])):
            out[i] = result
        progress.update(len(rows))
    return out
