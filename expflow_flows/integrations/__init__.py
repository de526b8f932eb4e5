"""Adapters to tracking tools (ClearML, Langfuse). Each module imports its SDK only
inside the functions that need it, so importing this package costs nothing."""
