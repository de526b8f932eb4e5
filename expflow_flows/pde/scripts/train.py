"""Script form of ``expflow_flows.pde.trainables:train`` (the "script" kind of trainable).

Run as ``python expflow_flows/pde/scripts/train.py --name value ...``; ``--help`` lists every
parameter. Reads EXPFLOW_RUN_DIR (default: the current folder), EXPFLOW_BUDGET_* and
EXPFLOW_UPSTREAM_RUN_DIR; prints ``EXPFLOW_METRIC step=N ...`` lines per epoch and writes the
final metrics as JSON to EXPFLOW_METRICS_FILE (or prints ``EXPFLOW_METRIC name=value`` lines).
"""

import sys

from expflow_flows.pde.trainables import script_main

if __name__ == "__main__":
    sys.exit(script_main("train"))
