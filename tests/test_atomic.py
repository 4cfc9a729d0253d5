"""utils/atomic.py: whole-or-nothing writes, owner-only files, and no plaintext left by a killed writer."""
import os
import signal
import subprocess
import sys
import textwrap

from utils.atomic import atomic_path, write_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_is_owner_only_and_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.bin"
    write_bytes(target, b"old")
    assert oct(os.stat(target).st_mode & 0o777) == "0o600"
    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            f.write(b"half")
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_a_sigkilled_checkpoint_write_leaves_no_temp_after_the_next_write(tmp_path):
    """SIGKILL between mkstemp and the rename leaves `.ckpt.pt.XXXX.tmp` (plaintext weights); the next
    write of the same target removes it, and leaves other files alone."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from utils.atomic import atomic_path
        with atomic_path({str(tmp_path / 'ckpt.pt')!r}) as tmp, open(tmp, "wb") as f:
            f.write(b"plaintext weights" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script])
    assert r.returncode == -signal.SIGKILL
    left = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".ckpt.pt.")
    (tmp_path / ".other.pt.abc.tmp").write_bytes(b"another target's temp")

    from tests.conftest import tiny_model
    from utils.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "ckpt.pt", tiny_model())
    assert sorted(os.listdir(tmp_path)) == [".other.pt.abc.tmp", "ckpt.pt"]
