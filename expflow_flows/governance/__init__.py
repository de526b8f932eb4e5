"""Governance: the PIN guard, the experiment ledger and its lifecycle, audits, off-peak policy."""
