"""`vtkit plot`."""

from vtkit.errors import NotBuiltError


def plot() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit plot is not built yet")
