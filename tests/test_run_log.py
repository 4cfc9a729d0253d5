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


def test_event_echoes_the_line_and_logs_the_entry_and_a_disabled_log_does_neither(tmp_path):
    lines = []
    log = RunLog(tmp_path / "log.jsonl", echo=lines.append)
    log.event("iter 1 | loss 2.0", event="iter", iter=1)
    log.close()
    assert lines == ["iter 1 | loss 2.0"]
    assert json.loads((tmp_path / "log.jsonl").read_text()) == {"event": "iter", "iter": 1}
    off = RunLog(tmp_path / "rank1" / "log.jsonl", echo=lines.append, enabled=False)  # a non-master rank
    off.event("iter 1", event="iter")
    off.close()
    assert lines == ["iter 1 | loss 2.0"] and not (tmp_path / "rank1").exists()
