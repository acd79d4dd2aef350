"""An interrupt while a thread pool works (MONAI CacheDataset fills its cache in one) ends
with the command's exit status, not an abort: the pool's workers are let finish their task
before Python exits (a worker still inside torch at exit aborts the process, exit 134)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

SCRIPT = """
import os, signal, sys, threading
from multiprocessing.pool import ThreadPool
import torch
import medseg.cli as cli

torch.set_num_threads(1)

def busy(i):
    x = torch.randn(300, 300)
    for _ in range(150):
        x = torch.tanh(x @ x.T)
    return i

def stopped_while_caching(args):
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.{signal})).start()
    with ThreadPool(1) as pool:
        list(pool.imap(busy, range(100)))

cli.cmd_check = stopped_while_caching
sys.exit(cli.main(["check", "anything"]))
"""


@pytest.mark.parametrize(("signal_name", "status", "line"),
                         [("SIGINT", 130, "medseg: interrupted"),
                          ("SIGTERM", 143, "medseg: stopped (SIGTERM)")])
def test_a_stop_while_a_thread_pool_works_exits_with_its_status(signal_name, status, line):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(signal=signal_name)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == status, done.stderr[-500:]
    assert line in done.stderr and "terminate called" not in done.stderr
