"""Parameter sweeps: spaces, the results store, identities for caching, and results tables.

Import from the submodules (``expflow_flows.sweep.space`` …); this package stays import-light.
"""
