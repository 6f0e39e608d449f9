"""The eval's own error types (data and checkpoint problems have theirs: DataError, CheckpointError)."""

__all__ = ["RunError", "NoImagesError", "RankExit"]


class RunError(RuntimeError):
    """A problem with the run's settings or output folder; the message says what to do."""


class NoImagesError(RunError):
    """The run finished and its results are written, but some cell saw no readable image (exit code 3)."""


class RankExit(SystemExit):
    """A rank > 0 of a distributed run ends because some rank failed: rank 0 prints the one line, this rank
    exits with the same code and prints nothing."""
