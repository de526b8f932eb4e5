"""The ``expflow`` command line (``main``)."""

from expflow_flows.cli.app import app, main

__all__ = ["app", "main"]
