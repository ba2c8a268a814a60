"""The base of every error that is the user's to fix (a missing file, a bad config, a damaged
checkpoint): the command line prints its message and exits 2 instead of a traceback. Also the
warning category for settings that work but run far slower than they should."""


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
