"""`vtkit demo`."""

from vtkit.errors import NotBuiltError


def demo() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit demo is not built yet")
