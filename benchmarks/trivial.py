"""A trivial objective for the orchestration benchmark (importable by Dask workers)."""


def objective(params):
    """Quadratic bowl; costs microseconds, so the timing is all orchestration."""
    return {"loss": (float(params["x"]) - 2.0) ** 2}


def sweep_trivial(params):
    """A combination that costs nothing: the timing is all orchestration."""
    return {"value": float(params["x"]) * 2.0}


def sleep_50ms(params):
    import time

    time.sleep(0.05)
    return {"value": float(params["x"])}


def cpu_half_second(params):
    """0.5 s of pure-Python CPU work."""
    import time

    end = time.process_time() + 0.5
    n = 0
    while time.process_time() < end:
        n += 1
    return {"value": float(params["x"]), "loops": float(n)}


def cpu_one_second(params):
    import time

    end = time.process_time() + 1.0
    while time.process_time() < end:
        pass
    return {"value": float(params["x"])}
