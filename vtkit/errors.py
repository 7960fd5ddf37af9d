"""The errors vtkit turns into a one-line message and an exit code.

Library code raises these; the CLI catches them in one place
(:func:`vtkit.cli.output.handles_errors`), prints ``error: <message>`` on stderr and exits with
:attr:`exit_code`. OS errors that reach it are turned into one line the same way
(:func:`os_error_message`).
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


def list_offenders(what: str, offenders: list[str], limit: int = 10) -> str:
    """Format up to ``limit`` offenders and the total count, for one-line error messages."""
    shown = ", ".join(offenders[:limit])
    more = f" (and {len(offenders) - limit} more)" if len(offenders) > limit else ""
    return f"{len(offenders)} {what}: {shown}{more}"


class StorageError(VtkitError):
    """A file could not be written or read: no space, a size limit, permissions, I/O (exit 1)."""

    exit_code = 1


class LockedError(VtkitError):
    """Another vtkit process is writing into the same output directory (exit code 1)."""

    exit_code = 1


#: What to do about an OS error, by errno name; the default covers the rest.
_OS_ERROR_HINTS = {
    "ENOSPC": "free space and re-run",
    "EDQUOT": "free space (disk quota exceeded) and re-run",
    "EFBIG": "the file-size limit (ulimit -f) was reached; raise it and re-run",
    "EACCES": "check its permissions or choose another --output-dir",
    "EPERM": "check its permissions or choose another --output-dir",
    "EROFS": "the filesystem is read-only; choose another --output-dir",
    "EIO": "the disk reported an I/O error; check it and re-run",
}


def os_error_message(error: OSError, path: object = None, action: str = "write",
                     kept: str = "") -> str:
    """One line for an OS error: the file, the system's reason, what to do.

    ``kept`` is appended after the advice (e.g. "finished parts are kept").
    """
    import errno as errno_names

    path = path if path is not None else getattr(error, "filename", None)
    reason = error.strerror or str(error) or type(error).__name__
    name = errno_names.errorcode.get(error.errno or 0, "")
    hint = _OS_ERROR_HINTS.get(name, "fix the cause and re-run")
    where = f"cannot {action} {path}: " if path else ""
    return f"{where}{reason}; {hint}" + (f": {kept}" if kept else "")
