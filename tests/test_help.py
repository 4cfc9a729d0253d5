"""Every script answers --help and -h: a usage line, every key with a default that reads back as itself
and a description, exit 0, and nothing else run (no file written, no checkpoint loaded, no model built,
no subprocess, no network connection: no download). Scripts are discovered (any file with a __main__
block), so a new script without help fails here.

The scripts run in one child process (importing torch once for all of them, not 2 x 30 times on a
2-core machine), each through runpy exactly as `python script.py --help` runs it; two real
subprocesses check the command line itself."""
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERNS = ("*.py", "utils/*.py", "test_pipeline/*.py", "data/*/prepare.py", "bench/*.py")


def discover_scripts():
    found = []
    for pattern in PATTERNS:
        for path in sorted(glob.glob(os.path.join(REPO, pattern))):
            with open(path, encoding="utf-8") as f:
                if 'if __name__ == "__main__":' in f.read():
                    found.append(os.path.relpath(path, REPO))
    return found


SCRIPTS = discover_scripts()
# finetune_encrypt_memmap's subcommands are scripts of their own as far as the user is concerned
COMMANDS = [(s, []) for s in SCRIPTS] + [("finetune_encrypt_memmap.py", ["apply"]),
                                         ("finetune_encrypt_memmap.py", ["keygen"])]

DRIVER = r'''
import contextlib, io, json, os, runpy, sys
import subprocess
import torch
import configurator, model

calls = []
def refuse(what):
    def stop(*args, **kwargs):
        calls.append(what)
        raise RuntimeError(f"--help ran {what}")
    return stop
torch.load = refuse("torch.load")
model.GPT.__init__ = refuse("GPT(...)")
subprocess.Popen.__init__ = refuse("a subprocess")
import socket
socket.socket.connect = refuse("a network connection")

real_configure, real_help_text = configurator.configure, configurator.help_text
seen = []
def recording_help_text(defaults, frame, argv):  # configure passes its caller's frame: wrapping here is safe
    seen.append(defaults)
    return real_help_text(defaults, frame, argv)
configurator.help_text = recording_help_text

results = []
cwd, commands, repo = os.getcwd(), json.loads(sys.argv[1]), sys.argv[2]
for script, command in commands:
    for flag in ("--help", "-h"):
        path = os.path.join(repo, script)
        sys.argv[:] = [path] + command + [flag]
        sys.path[0] = os.path.dirname(path)
        seen.clear(); calls.clear()
        out, err, code = io.StringIO(), io.StringIO(), "returned without exiting"
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                code = e.code or 0
            except BaseException as e:
                code = f"{type(e).__name__}: {e}"
        keys = {}
        if seen:
            lines = out.getvalue().splitlines()
            for key, default in seen[-1].items():
                line = next((l for l in lines if l.startswith(f"  --{key}=")), None)
                if line is None:
                    keys[key] = {"listed": False}
                    continue
                option, _, description = line[len(f"  --{key}="):].partition("  # ")
                try:
                    reads_back = real_configure(seen[-1], [f"--{key}={option.rstrip()}"])[key] == default
                except Exception:
                    reads_back = False
                keys[key] = {"listed": True, "description": description.strip(), "reads_back": reads_back}
        results.append({"script": script, "command": command, "flag": flag, "code": code,
                        "stdout": out.getvalue(), "stderr": err.getvalue(), "keys": keys,
                        "configured": bool(seen), "ran": list(calls), "written": sorted(os.listdir(cwd))})
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    cache = tmp_path_factory.mktemp("tiktoken")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "MPLBACKEND": "Agg", "PYTHONPATH": REPO,
           "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(COMMANDS), REPO], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.listdir(cache), "--help touched the tiktoken cache"
    runs = {}
    for run in json.loads(r.stdout.splitlines()[-1]):
        runs.setdefault((run["script"], tuple(run["command"])), []).append(run)
    return runs


def test_discovery_finds_the_user_facing_scripts():
    for script in ("train.py", "sample.py", "finetune_dp.py", "finetune_encrypt_memmap.py", "synthesize_dp.py",
                   "reproduce.py", "demo.py", "test_pipeline/mia.py", "data/pydocs/prepare.py",
                   "utils/tiktoken_cache.py", "utils/inspect_ckpt.py", "utils/plot.py"):
        assert script in SCRIPTS


@pytest.mark.parametrize("script, command", COMMANDS, ids=[" ".join([s] + c) for s, c in COMMANDS])
def test_help_lists_every_key_and_runs_nothing(help_runs, script, command):
    for run in help_runs[(script, tuple(command))]:
        flag = run["flag"]
        assert run["code"] == 0, f"{script} {flag}: exit {run['code']!r}; stderr: {run['stderr'][-500:]}"
        assert run["configured"], f"{script} {flag} does not print its help through configurator.configure"
        assert run["stdout"].startswith(f"usage: python {' '.join([script] + command)} "), run["stdout"][:200]
        assert not run["ran"], f"{script} {flag} ran {run['ran']}"
        assert not run["written"], f"{script} {flag} wrote {run['written']}"
        assert not run["stderr"].strip(), f"{script} {flag} printed on stderr: {run['stderr'][-300:]}"
        assert run["keys"], f"{script} {flag}: no keys"
        unlisted = [k for k, v in run["keys"].items() if not v["listed"]]
        undescribed = [k for k, v in run["keys"].items() if v["listed"] and not v["description"]]
        wrong_default = [k for k, v in run["keys"].items() if v["listed"] and not v["reads_back"]]
        assert not unlisted, f"{script} {flag}: keys missing from the help: {unlisted}"
        assert not undescribed, f"{script} {flag}: keys without a trailing comment in their DEFAULTS: {undescribed}"
        assert not wrong_default, f"{script} {flag}: shown defaults that do not read back: {wrong_default}"


@pytest.mark.parametrize("argv", [["train.py", "-h"], ["-m", "utils.tiktoken_cache", "--help"]])
def test_help_on_the_real_command_line(tmp_path, argv):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": REPO}
    target = [os.path.join(REPO, argv[0])] + argv[1:] if argv[0].endswith(".py") else argv
    r = subprocess.run([sys.executable] + target, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python ") and "--" in r.stdout
    assert os.listdir(tmp_path) == []  # no cache seeded, no out/ folder


def test_unknown_option_is_refused_before_work(tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "utils.tiktoken_cache", "--chek"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown option --chek")
    assert os.listdir(tmp_path) == []
