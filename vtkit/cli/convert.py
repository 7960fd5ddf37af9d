"""`vtkit convert`."""

from vtkit.errors import NotBuiltError


def convert() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit convert is not built yet")
