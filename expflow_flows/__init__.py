"""expflow-flows: Prefect flows for ML experiment work.

Importing the package stays cheap: flows and optional integrations are imported
from their own modules (``expflow_flows.flows.pipeline``), never from here.
"""

__version__ = "0.2.0"
