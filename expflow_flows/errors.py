"""The one exception type for mistakes a user can make (bad input, refused acts)."""


class ExpflowError(Exception):
    """A user-facing error: one line naming the bad value and what would be accepted."""


class GuardRefused(ExpflowError):
    """A PIN guard refused a destructive or irreversible act."""


class GateFailed(ExpflowError):
    """A metric gate did not pass; the message names metric, value and threshold."""
