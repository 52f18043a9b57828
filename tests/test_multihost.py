"""A real two-process run on localhost: jax.distributed joins 2 processes x 2 CPU devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_save_resume_and_agree_on_the_loss(tmp_path):
    port = _free_port()
    worker = os.path.join(ROOT, "tests", "multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(port), str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, out[-4000:]
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    a, b = results
    assert a["devices"] == 4 and a["local"] == 2
    assert a["first"][:2] == ["completed", 4] and a["second"][:2] == ["completed", 6]
    # Both processes see the same global loss, before and after the save/restore.
    assert a["first"] == b["first"] and a["second"] == b["second"]
    assert "[base] resumed from checkpoint step 4" in outs[0]
    # Steps 1-2 and 5-6 ran as two-step calls (3 and 4 singly: summary_every=3).
    assert a["multi_step_calls"] == b["multi_step_calls"] == [2, 2]
