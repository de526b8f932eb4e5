"""A small, honest PDEBench-style workload: problem registry, synthetic data, a numpy baseline.

Submodules (import them directly; this package imports nothing heavy):

* :mod:`expflow_flows.pde.registry` - PDEBench's 11 forward problems, their files and parameters.
* :mod:`expflow_flows.pde.generate` - synthetic data in PDEBench's own HDF5 layout.
* :mod:`expflow_flows.pde.data` - load PDEBench 1D files with PDEBench's train/test split.
* :mod:`expflow_flows.pde.model` - a numpy spectral-operator baseline trained autoregressively.
* :mod:`expflow_flows.pde.metrics` - PDEBench's ``metric_func`` metrics in numpy.
* :mod:`expflow_flows.pde.trainables` - ``train`` / ``evaluate`` callables for the trainable contract.
* :mod:`expflow_flows.pde.audit` - the PDEBench dataset audit.
* :mod:`expflow_flows.pde.plugin` - ``register``: adds the PDEBench metrics and dataset audit
  to the generic registries (entry point ``pde`` of the ``expflow_flows.workloads`` group).
"""
