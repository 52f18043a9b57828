"""One process of a two-process tokenizer run that is preempted (run by tests/test_multihost.py).

Usage: python tests/preemption_worker.py PROCESS_ID PORT WORKDIR PHASE -> one `RESULT {json}` line.
Each process owns 2 CPU devices, and jax.distributed joins them into one 4-device mesh. Every
run trains the same stage config toward FINAL_STEP, two steps per call, and shares one
compilation cache under WORKDIR.

  preempt: trains WORKDIR/preempted and writes WORKDIR/ready<PROCESS_ID> once its loop runs
           (progress lines come from process 0 only). The test then sends SIGTERM to one
           process; both must stop at the same step.
  resume:  a restart. It resumes WORKDIR/preempted to FINAL_STEP and trains WORKDIR/whole there
           without a break.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from helpers import ROOT  # noqa: E402  (run as a script, tests/ is sys.path[0])

sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, workdir, phase = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

from jax import monitoring  # noqa: E402

from configs import shapes_tiny  # noqa: E402
from muse_jax.train import summaries, trainer  # noqa: E402
from muse_jax.train.tokenizer_stage import TokenizerStage  # noqa: E402

FINAL_STEP = 40
cache_hits = []
monitoring.register_event_listener(
    lambda event, **kw: cache_hits.append(1) if event.endswith("/cache_hits") else None
)

config = shapes_tiny.get_config("smoke")
config.data.data_dir = os.path.join(workdir, "data")
config.compilation_cache = os.path.join(workdir, "compilation_cache")
train = config.tokenizer.train
train.num_steps, train.steps_per_call, train.log_every = FINAL_STEP, 2, 2
train.checkpoint_every = train.summary_every = 1000


def run(name: str) -> list:
    result = trainer.train(config, os.path.join(workdir, name), "tokenizer")
    return [result.status, result.step]


def losses(name: str) -> dict[int, float]:
    return summaries.read_scalars(os.path.join(workdir, name, "tokenizer"))["train/loss"]


out = {}
if phase == "preempt":
    real_batches = TokenizerStage.batches

    def announcing(self, seed, start_step=0):
        for i, batch in enumerate(real_batches(self, seed, start_step)):
            if i == 4:  # The first call (batches 0 and 1) has compiled and been dispatched.
                open(os.path.join(workdir, f"ready{pid}"), "w").close()
            yield batch

    TokenizerStage.batches = announcing
    out["preempted"] = run("preempted")
else:
    out["resumed"] = run("preempted")
    out["cache_hits_on_restart"] = len(cache_hits)
    out["whole"] = run("whole")
    if pid == 0:  # Process 0 writes the TensorBoard events.
        out["losses"] = {name: losses(name) for name in ("preempted", "whole")}
print("RESULT " + json.dumps(out), flush=True)
