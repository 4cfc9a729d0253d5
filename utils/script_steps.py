"""Scripts that run other scripts as numbered, timed steps (demo.py, reproduce.py): each step is one
shell command, printed and then run exactly, so the run is also a recipe."""
import contextlib
import os
import resource
import runpy
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
    """Run `python SCRIPT args...` (SCRIPT relative to the repository root) in this process, as that command
    runs it (runpy, as __main__, with sys.argv set; like tests/test_help.py), without a step's banner: the
    libraries are imported once for every script a run calls, not once per child process. Its output goes
    to log_path when given (test_pipeline/report.py's sub-runs), else to this process's stdout. Returns the
    exit code. A script that decrypts a patch hardens this process (utils/secure_memory.py)."""
    path = repo_path(argv[0])
    saved_argv, sys.argv = sys.argv, [path] + argv[1:]
    try:
        with contextlib.ExitStack() as stack:
            if log_path is not None:
                log = stack.enter_context(open(log_path, "w", encoding="utf-8"))
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            try:
                runpy.run_path(path, run_name="__main__")
                code = 0
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    if code == 130:  # run_cli's exit for Ctrl-C: stop the caller too
        raise KeyboardInterrupt
    return code


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
