"""The one exception type dmx raises for bad input.

It subclasses mxref.MXError (itself a ValueError), so callers that already catch
the golden model's errors -- the CLIs turn them into one-line exit-2 messages --
catch dmx's too.
"""
from mxref.errors import MXError


class DMXError(MXError):
    """Bad input to dmx: the message names the problem and what to do instead."""
