"""Scripts that run other scripts as numbered, timed steps (demo.py, reproduce.py): each step is one
shell command, printed and then run exactly, so the run is also a recipe."""
import os
import resource
import shlex
import subprocess
import sys
import time

from utils.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Steps:
    """Numbered steps, each one shell command: printed, run (inheriting stdout), timed (wall and CPU)."""

    def __init__(self, log=print):
        self.log = log
        self.timings = []
        self.n = 0
        self.last_command = ""

    def run(self, title, argv, check=True):
        """Run `python SCRIPT args...` (SCRIPT relative to the repository root); returns the exit code."""
        self.n += 1
        cmd = [repo_path(argv[0])] + argv[1:]
        shown = self.last_command = "python " + " ".join(shlex.quote(a) for a in cmd)
        self.log(f"\n=== {self.n}. {title}\n$ {shown}", flush=True)
        cpu0, t0 = children_cpu(), time.perf_counter()
        code = subprocess.call([sys.executable] + cmd)
        wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
        self.timings.append((title, wall, cpu))
        if check and code != 0:
            raise UserError(f"step {self.n} ({title}) failed with exit code {code}: {shown}", exit_code=1)
        return code

    def summary(self):
        lines = [f"{'step':<44} {'wall s':>8} {'cpu s':>8}"]
        for title, wall, cpu in self.timings:
            lines.append(f"{title[:44]:<44} {wall:8.1f} {cpu:8.1f}")
        lines.append(f"{'total':<44} {sum(t[1] for t in self.timings):8.1f} {sum(t[2] for t in self.timings):8.1f}")
        return "\n".join(lines)


def run_script(argv, log_path=None):
    """Run `python SCRIPT args...` (SCRIPT relative to the repository root) in its own process, without a
    step's banner: its output goes to log_path when given (test_pipeline/report.py's sub-runs), else to
    this process's stdout. Returns the exit code."""
    cmd = [sys.executable, repo_path(argv[0])] + argv[1:]
    if log_path is None:
        sys.stdout.flush()  # what this process printed comes before the child's output
        return subprocess.call(cmd)
    with open(log_path, "wb") as log:
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def repo_path(path):
    """A file of the repository, as a path from the current directory (just `path` from the root)."""
    return os.path.relpath(os.path.join(REPO, path))


def children_cpu():
    """User + system CPU seconds of every finished child process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def opts(**kw):
    """--key=value arguments, tuples as comma lists."""
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in kw.items()]
