"""utils.run_log: each line is on disk as soon as it is written, resume appends, the file is owner-only."""
import json
import os
import stat

from utils.run_log import RunLog


def test_lines_reach_disk_as_written_and_resume_appends(tmp_path):
    path = tmp_path / "out" / "log.jsonl"
    log = RunLog(path)
    log.write({"event": "config", "eps": float("inf")})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"event": "config", "eps": None}]
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = RunLog(path, append=True)
    again.write({"event": "resume"})
    again.close()
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["config", "resume"]
    RunLog(path).close()  # a fresh run starts a fresh log
    assert path.read_text() == ""
