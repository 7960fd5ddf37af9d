"""`vtkit rank`."""

from vtkit.errors import NotBuiltError


def rank() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit rank is not built yet")
