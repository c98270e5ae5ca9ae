"""The one exception type users see from mxref; CLIs turn it into a one-line exit-2 error."""


class MXError(ValueError):
    """Bad input to mxref: the message names the problem and what to do."""
