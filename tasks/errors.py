"""The one exception type that means "the user can fix this": the CLI prints it as one line and exits 1."""


class UserError(Exception):
    """Bad input or environment, with a message that names the problem and the fix. ``retryable``: whether the
    same call may succeed if tried again (a network hiccup), as opposed to failing the same way (a checksum)."""

    retryable: bool = False
