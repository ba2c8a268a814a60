"""The base of every error that is the user's to fix (a missing file, a bad config, a damaged
checkpoint): the command line prints its message and exits 2 instead of a traceback. Also the
warning category for settings that work but run far slower than they should."""

import errno


class UserError(Exception):
    """An error whose message tells the user what is wrong and what to do."""


class NonFiniteError(ValueError):
    """An input holds NaN or inf (a ValueError, so callers that check inputs keep working; the
    trainer catches this type to report a diverged run)."""


class MemoryDivergedError(NonFiniteError):
    """A neural memory's test-time updates grew without bound: its answers stopped being finite
    (the message names the token and head where it began and the settings that bound the updates)."""


class StateMismatchError(UserError, ValueError):
    """A state from a model or layer of another layout (variant, sizes, memory shape, segment or
    window): the message names both sides."""


class PerformanceWarning(UserWarning):
    """A setting that works but runs far slower than it should on this hardware (the message
    says which setting and what to use instead)."""


_REMEDIES = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space under your quota or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission for that path: choose one you may use",
    errno.EPERM: "no permission for that path: choose one you may use",
}
# failures of a write that no input can cause: a checkpoint or result could not be written
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def machine_refused(err: BaseException) -> bool:
    """Whether ``err`` is a file operation the machine refused for a reason the user fixes there
    (full disk or quota, read-only file system, no permission); other OSErrors are bugs or
    missing inputs, which keep their own messages."""
    return isinstance(err, OSError) and err.errno in _REMEDIES


def describe_os_error(err: OSError) -> str:
    """One line for a refused file operation: the cause, the path and what to do."""
    cause = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    remedy = _REMEDIES.get(err.errno)
    return f"{cause}{where}" + (f"; {remedy}" if remedy else "")


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation the machine could not serve (CPU or accelerator)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, at most ``limit`` characters."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
