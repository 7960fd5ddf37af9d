"""`vtkit bench`."""

from vtkit.errors import NotBuiltError


def bench() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit bench is not built yet")
