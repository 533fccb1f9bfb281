"""``allmap train`` with a fault injected: run under torchrun by tests/test_faults.py (not a test module).

    ALLMAP_KILL_AT=13 ALLMAP_KILL_RANK=1 torchrun --max-restarts=1 ... tests/_fault_worker.py train PRESET ...

The worker of rank ``ALLMAP_KILL_RANK`` sends itself SIGKILL after iteration ``ALLMAP_KILL_AT`` of the
first attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT`` = 0); restarted workers run undisturbed.
"""

import functools
import os
import signal
import sys

import torch.distributed as dist

import allmap.app.trainer as loop
from allmap.app.distributed import restart_count
from allmap.cli import main

KILL_AT = int(os.environ.get("ALLMAP_KILL_AT", "0"))
KILL_RANK = int(os.environ.get("ALLMAP_KILL_RANK", "0"))


def kill(iteration, learner):
    rank = dist.get_rank() if dist.is_initialized() else 0
    if restart_count() == 0 and rank == KILL_RANK and iteration == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


loop.train = functools.partial(loop.train, callback=kill)
loop.resume = functools.partial(loop.resume, callback=kill)
sys.exit(main(sys.argv[1:]))
