"""`vtkit score`."""

from vtkit.errors import NotBuiltError


def score() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit score is not built yet")
