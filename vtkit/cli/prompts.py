"""`vtkit prompts`."""

from vtkit.errors import NotBuiltError


def prompts() -> None:
    """Not built yet."""
    raise NotBuiltError("vtkit prompts is not built yet")
