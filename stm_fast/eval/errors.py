"""The eval's own error type (data and checkpoint problems have theirs: DataError, CheckpointError)."""

__all__ = ["RunError"]


class RunError(RuntimeError):
    """A problem with the run's settings or output folder; the message says what to do."""
