"""The one exception type for user mistakes (bad input, bad flags, bad files).

The CLI prints `error: <message>` on one line and exits 2; the HTTP layer answers 4xx. Anything else that escapes
is a bug in ncf_ray and keeps its stack trace.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the offending value."""
