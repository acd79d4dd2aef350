"""An interrupt while a thread pool works (MONAI CacheDataset fills its cache in one) ends
with the command's exit status, not an abort: the pool's workers are let finish their task
before Python exits (a worker still inside torch at exit aborts the process, exit 134). The
bar left open is closed first, so that the stop's message is a line of its own."""

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
from tqdm import tqdm
import medseg.cli as cli

torch.set_num_threads(1)

def busy(i):
    x = torch.randn(300, 300)
    for _ in range(150):
        x = torch.tanh(x @ x.T)
    return i

def stopped_while_caching(args):
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.{signal})).start()
    bar = tqdm(total=100, desc="caching")  # a bar that nothing closes on the way out
    with ThreadPool(1) as pool:
        for _ in pool.imap(busy, range(100)):
            bar.update(1)

cli.cmd_check = stopped_while_caching
sys.exit(cli.main(["check", "anything"]))
"""


@pytest.mark.parametrize(("signal_name", "status", "line"),
                         [("SIGINT", 130, "medseg: interrupted"),
                          ("SIGTERM", 143, "medseg: stopped (SIGTERM)")])
def test_a_stop_while_a_thread_pool_works_exits_with_its_status(signal_name, status, line):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(signal=signal_name)],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env=env, cwd=REPO)
    assert done.returncode == status, done.stderr[-500:]
    assert "terminate called" not in done.stderr
    assert f"\n{line}\n" in done.stderr  # a line of its own, not after the bar's last draw
