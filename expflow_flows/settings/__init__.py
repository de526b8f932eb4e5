"""Typed settings of the pipeline and the sweep, written once (pydantic models).

YAML files, ``--set key=value``, CLI options, deployment parameters and Python calls
all validate through these models; see :mod:`expflow_flows.settings.base`.
"""
