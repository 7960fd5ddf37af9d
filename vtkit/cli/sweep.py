"""`vtkit sweep`."""

from vtkit.errors import NotBuiltError


def sweep() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit sweep is not built yet")
