"""Prefect flows. Import the flow you need from its module, e.g. ``expflow_flows.flows.pipeline``."""
