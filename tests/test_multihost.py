"""Real two-process runs on localhost: jax.distributed joins 2 processes x 2 CPU devices."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from muse_jax import checkpoints
from tests.helpers import ROOT, start_python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(script: str, *args: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of `tests/<script>`, joined through a fresh coordinator port."""
    port = str(_free_port())
    path = os.path.join(ROOT, "tests", script)
    return [start_python(path, str(i), port, *args) for i in range(2)]


def _results(procs: list[subprocess.Popen], timeout: float) -> tuple[list[dict], list[str]]:
    """Each process's last `RESULT {json}` line and its whole output; both must exit 0."""
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, out[-4000:]
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results, outs


@pytest.mark.slow
def test_two_processes_train_save_resume_and_agree_on_the_loss_and_the_time_budget(tmp_path):
    (a, b), outs = _results(_start("multiprocess_worker.py", str(tmp_path)), timeout=600)
    assert a["devices"] == 4 and a["local"] == 2
    # Process 1's time budget stops process 0 too, one call later, at the same step.
    assert a["tokenizer"] == b["tokenizer"] == ["time_budget", 2]
    assert a["first"][:2] == ["completed", 4] and a["second"][:2] == ["completed", 6]
    # Both processes see the same global loss, before and after the save/restore.
    assert a["first"] == b["first"] and a["second"] == b["second"]
    assert "[base] resumed from checkpoint step 4" in outs[0]
    # Steps 1-2 and 5-6 ran as two-step calls (3 and 4 singly: summary_every=3).
    assert a["multi_step_calls"] == b["multi_step_calls"] == [2, 2]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_the_restart_is_exact(tmp_path):
    """SIGTERM reaches process 1 only: both processes save the same step and exit 0. The restart
    loads its programs from the compilation cache and ends with the losses of a run that was
    never stopped."""
    procs = _start("preemption_worker.py", str(tmp_path), "preempt")
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    deadline = time.time() + 300
    while not all(r.exists() for r in ready):
        running = all(p.poll() is None for p in procs)
        if not running or time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail("workers never started training:\n" + procs[0].communicate()[0][-4000:])
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    t_signal = time.time()
    (a, b), _ = _results(procs, timeout=120)
    assert time.time() - t_signal < 60  # Seconds on a loaded 2-core machine; a hang is 120+.
    status, stopped = a["preempted"]
    assert [status, stopped] == b["preempted"] and status == "preempted" and 0 < stopped < 40
    ckpt_dir = checkpoints.checkpoint_dir(str(tmp_path / "preempted" / "tokenizer"))
    assert checkpoints.finalized_steps(ckpt_dir)[-1] == stopped

    (a, b), outs = _results(_start("preemption_worker.py", str(tmp_path), "resume"), timeout=400)
    assert f"[tokenizer] resumed from checkpoint step {stopped}" in outs[0]
    assert a["resumed"] == a["whole"] == b["resumed"] == b["whole"] == ["completed", 40]
    # Process 0 writes the cache. XLA:CPU keys entries by a topology fingerprint that differs
    # between the processes, so on CPU only process 0 finds its programs there.
    assert a["cache_hits_on_restart"] > 0
    # Every loss logged by the stopped-and-resumed run equals the uninterrupted run's.
    resumed, whole = a["losses"]["preempted"], a["losses"]["whole"]
    assert sorted(int(s) for s in whole) == list(range(2, 41, 2))
    assert {s: resumed[s] for s in whole} == whole
