"""Prefect worker types of expflow-flows: `slurm` (sbatch) and `clearml` (ClearML queues).

Prefect imports this module through the `prefect.collections` entry point, from every
worker and from the server, so it must stay light: no optional SDK is imported here.
"""

from expflow_flows.workers.clearml import ClearMLWorker
from expflow_flows.workers.slurm import SlurmWorker

__all__ = ["ClearMLWorker", "SlurmWorker"]
