"""Leaving a torch.distributed process group without the gloo shutdown deadlock.

gloo's worker thread frees a finished collective under its queue lock, and freeing tensors that Python
created (all_reduce of a loss, all_gather_object) needs the GIL. A process group destroyed at that
moment, from Python (GIL held) and waiting for the same lock, deadlocks: seen with torch 2.13 in about
1 of 15 two-rank CPU runs, the last rank hanging forever after training finished. A barrier puts every
rank past its last collective, and a short pause (GIL released) lets the worker threads free it."""
import time

import torch.distributed as dist


def leave_process_group(finished=True, pause_s=0.2):
    """Destroy the default process group. finished=False (an exception is unwinding): skip the barrier,
    which the other ranks might never reach."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    time.sleep(pause_s)
    dist.destroy_process_group()
