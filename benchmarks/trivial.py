"""A trivial objective for the orchestration benchmark (importable by Dask workers)."""


def objective(params):
    """Quadratic bowl; costs microseconds, so the timing is all orchestration."""
    return {"loss": (float(params["x"]) - 2.0) ** 2}
