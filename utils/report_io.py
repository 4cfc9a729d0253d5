"""Reading the JSON results that sub-runs wrote (test_pipeline/report.py, reproduce.py): a file that is
not there reads as None, and a nested lookup that meets a missing key gives None, so a report can show
"–" for a part that did not run."""
import json
import os


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
