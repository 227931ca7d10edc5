"""User-facing errors.

Anything raised as :class:`HistoliteError` is a problem with the user's input (a file, a field, a
value); the CLI prints its message and exits with status 2 instead of showing a traceback.
"""


class HistoliteError(Exception):
    """A problem the user can fix; the message names the file/field/value and what was expected."""


class DataError(HistoliteError):
    """An image, folder, split file or dataset is missing, unreadable or inconsistent."""


class ConfigError(HistoliteError):
    """A config file or override is malformed or names an unknown key or value."""


class HistoliteWarning(UserWarning):
    """Something the user should know about their data or run; the CLI prints it plainly."""


class ModelError(HistoliteError):
    """An unknown model name, or weights that do not fit the model."""
