"""A training script as research code writes it, that checkpoints and resumes.

It knows nothing of expflow beyond three environment variables: it saves its state
every step into $EXPFLOW_CHECKPOINT_DIR (atomically), resumes from it, and on SIGUSR1
(its job ends soon) saves and exits with code 3. It prints its pid into the checkpoint
folder so a test can kill it, and its steps as EXPFLOW_METRIC lines.
"""

import argparse
import json
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--delay", type=float, default=0.3)
args = parser.parse_args()

folder = os.environ.get("EXPFLOW_CHECKPOINT_DIR", ".")
state_file = os.path.join(folder, "state.json")
with open(os.path.join(folder, "pid"), "w") as fh:
    fh.write(f"{os.getpid()} {os.getppid()}\n")

step, loss = 0, 10.0
if os.path.exists(state_file):
    with open(state_file) as fh:
        state = json.load(fh)
    step, loss = state["step"], state["loss"]
    print(f"resumed from step {step}", flush=True)

told = []
signal.signal(signal.SIGUSR1, lambda *_: told.append(1))

while step < args.steps:
    time.sleep(args.delay)
    step += 1
    loss = loss * (1 - args.lr)
    tmp = state_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"step": step, "loss": loss}, fh)
    os.replace(tmp, state_file)
    print(f"EXPFLOW_METRIC step={step} loss={loss}", flush=True)
    if told:
        print(f"saved at step {step}; stopping for the job's end", flush=True)
        sys.exit(3)
print(f"EXPFLOW_METRIC loss={loss} steps={step}", flush=True)
