"""utils/progress.py: done/total lines with a rate, an ETA and the flag that makes the step cheaper; quiet
for short steps; batched() keeps the caller's order."""
import io

from utils.progress import Progress, batched, format_eta


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_count_done_total_with_eta_and_hint():
    clock, out = Clock(), io.StringIO()
    p = Progress("leakage candidates", 400, hint="--n_candidates", interval=5, stream=out, clock=clock)
    for _ in range(4):
        clock.t += 10  # 100 items per 10 s
        p.update(100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0] == "leakage candidates: 100/400 (25%) | 10/s | eta 0m30s | cheaper: --n_candidates"
    assert lines[-1].startswith("leakage candidates: 400/400 (100%)") and "eta 0m00s" in lines[-1]
    p.update(5)  # past the end: no second final line
    assert len(out.getvalue().splitlines()) == 4


def test_a_short_step_prints_nothing_and_lines_are_throttled():
    clock, out = Clock(), io.StringIO()
    p = Progress("eval", 1000, interval=5, stream=out, clock=clock)
    for _ in range(1000):
        clock.t += 0.001
        p.update()
    assert out.getvalue() == ""  # done within a second
    p = Progress("eval", 100, interval=5, stream=out, clock=clock)
    for _ in range(100):
        clock.t += 1
        p.update()
    assert len(out.getvalue().splitlines()) == 20  # one every 5 s, the last at 100/100
    assert format_eta(3725) == "1h02m" and format_eta(65) == "1m05s"


def test_batched_sorts_batches_and_restores_the_order():
    out, seen = io.StringIO(), []

    def fn(batch):
        seen.append(list(batch))
        return [s.upper() for s in batch]
    items = ["ccc", "a", "bb", "dddd", "e"]
    p = Progress("x", len(items), interval=0, stream=out)
    assert batched(fn, items, 2, p, key=len) == ["CCC", "A", "BB", "DDDD", "E"]
    assert seen == [["a", "e"], ["bb", "ccc"], ["dddd"]]
    assert out.getvalue().splitlines()[-1].startswith("x: 5/5")
