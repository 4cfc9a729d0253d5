"""log.jsonl of a training or fine-tuning run, written as the run goes."""
import json
import os

from utils.atomic import json_safe


class RunLog:
    """log.jsonl, written as the run goes (a crash loses at most the line being written): one JSON object
    per line, owner-only, appended to on resume. event() also echoes a readable line (echo=print, say).
    enabled=False (a non-master rank): nothing is written or echoed."""

    def __init__(self, path, append=False, echo=None, enabled=True):
        self.echo = echo if enabled and echo else (lambda *a, **k: None)
        self._file = None
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
            self._file = os.fdopen(os.open(path, flags, 0o600), "a")

    def write(self, entry):
        if self._file:
            self._file.write(json.dumps(json_safe(entry)) + "\n")
            self._file.flush()

    def event(self, line, **entry):
        """The readable line to echo, and the entry to the file."""
        self.echo(line)
        self.write(entry)

    def sync(self):
        if self._file:
            os.fsync(self._file.fileno())

    def close(self):
        if self._file:
            self.sync()
            self._file.close()
            self._file = None
