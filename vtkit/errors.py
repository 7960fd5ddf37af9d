"""The errors vtkit turns into a one-line message and an exit code.

Library code raises these; the CLI catches them in one place (:func:`vtkit.cli.main.main`),
prints ``error: <message>`` on stderr and exits with :attr:`exit_code`.
"""


class VtkitError(Exception):
    """A known failure with a message fit for a user."""

    exit_code = 1


class UsageError(VtkitError):
    """A flag or argument has a bad value (exit code 2)."""

    exit_code = 2


class DataError(VtkitError):
    """An input file, question or image is missing, malformed or unreadable (exit code 1)."""

    exit_code = 1


class CacheMismatchError(VtkitError):
    """An existing cache or results file was made from other inputs (exit code 1)."""

    exit_code = 1


class NotBuiltError(VtkitError):
    """A command whose stage is not implemented yet (exit code 1)."""

    exit_code = 1


def list_offenders(what: str, offenders: list[str], limit: int = 10) -> str:
    """Format up to ``limit`` offenders and the total count, for one-line error messages."""
    shown = ", ".join(offenders[:limit])
    more = f" (and {len(offenders) - limit} more)" if len(offenders) > limit else ""
    return f"{len(offenders)} {what}: {shown}{more}"
