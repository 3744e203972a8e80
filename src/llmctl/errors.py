"""The error types the CLI maps to exit codes.

`UsageError` means the user's input or config is wrong (exit 2, one clear line naming the
file, line or key); anything else that escapes a command is an internal error (exit 1).
"""


class UsageError(Exception):
    """Bad input, bad config or a refused operation; the message is one line for the user."""
