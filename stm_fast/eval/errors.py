"""The eval's own error type (data and checkpoint problems have theirs: DataError, CheckpointError)."""

__all__ = ["RunError", "NoImagesError"]


class RunError(RuntimeError):
    """A problem with the run's settings or output folder; the message says what to do."""


class NoImagesError(RunError):
    """The run finished and its results are written, but some cell saw no readable image (exit code 3)."""
