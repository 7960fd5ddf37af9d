"""`vtkit extract`."""

from vtkit.errors import NotBuiltError


def extract() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit extract is not built yet")
