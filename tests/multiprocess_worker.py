"""One process of a two-process training run on localhost (run by tests/test_multihost.py).

Usage: python tests/multiprocess_worker.py PROCESS_ID PORT WORKDIR -> one JSON line.
Each process owns 2 CPU devices; jax.distributed joins them into one 4-device mesh. The
tokenizer stage has a time budget on process 1 only; the base stage runs two steps per call.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from helpers import ROOT  # noqa: E402  (run as a script, tests/ is sys.path[0])

sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

from configs import shapes_tiny  # noqa: E402
from muse_jax.train import trainer  # noqa: E402

multi_step_calls = []
_stack = trainer.stack_batches
trainer.stack_batches = lambda batches: multi_step_calls.append(len(batches)) or _stack(batches)

config = shapes_tiny.get_config("smoke")
config.tokenizer.train.num_steps = 4
# A budget on process 1 only, spent before the first step ends: both processes must stop.
config.tokenizer.train.time_budget_s = 1e-3 if pid == 1 else 0.0
tokenizer = trainer.train(config, workdir, "tokenizer")
train = config.base.train
train.num_steps, train.log_every, train.checkpoint_every = 4, 2, 2
train.steps_per_call = 2  # Each call: two steps over a stacked, process-spanning batch.
first = trainer.train(config, workdir, "base")
train.num_steps = 6
second = trainer.train(config, workdir, "base")
print(
    "RESULT "
    + json.dumps(
        {
            "devices": jax.device_count(),
            "local": jax.local_device_count(),
            "tokenizer": [tokenizer.status, tokenizer.step],
            "first": [first.status, first.step, first.metrics["loss"]],
            "second": [second.status, second.step, second.metrics["loss"]],
            "multi_step_calls": multi_step_calls,
        }
    ),
    flush=True,
)
