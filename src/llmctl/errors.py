"""The error types the CLI maps to exit codes.

`UsageError` means the user's input or config is wrong (exit 2, one clear line naming the
file, line or key); `DistributedFailure` that another training process failed and `WorkerDied`
that a data stage's worker process died (exit 1, one line each); anything else that escapes a
command is an internal error (exit 1).
"""


class UsageError(Exception):
    """Bad input, bad config or a refused operation; the message is one line for the user."""


class CheckpointError(UsageError, ValueError):
    """A checkpoint's files are missing, malformed or do not fit its config (`load_model`):
    a ValueError to library callers, a one-line usage error (exit 2) at the CLI."""


class DistributedFailure(Exception):
    """Another training process died, failed or stopped answering (a collective failed or timed
    out); the message is one line saying which rank saw it and that rerunning resumes."""


class WorkerDied(Exception):
    """A data stage's worker process died (killed by a signal, e.g. the OOM killer); the
    message is one line saying so and what to rerun."""
