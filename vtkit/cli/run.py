"""`vtkit run`."""

from vtkit.errors import NotBuiltError


def run() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit run is not built yet")
