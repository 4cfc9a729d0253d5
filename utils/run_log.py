"""log.jsonl of a fine-tuning run, written as the run goes."""
import json
import os

from utils.atomic import json_safe


class RunLog:
    """log.jsonl, written as the run goes (a crash loses at most the line being written): one JSON object
    per line, owner-only, appended to on resume."""

    def __init__(self, path, append=False):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self._file = os.fdopen(os.open(path, flags, 0o600), "a")

    def write(self, entry):
        self._file.write(json.dumps(json_safe(entry)) + "\n")
        self._file.flush()

    def sync(self):
        os.fsync(self._file.fileno())

    def close(self):
        self.sync()
        self._file.close()
