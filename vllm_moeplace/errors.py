"""One base class for errors caused by bad user input (files, flags), so the CLI can print them
as a single clear line instead of a traceback."""


class MoeplaceError(ValueError):
    """Bad input: the message names the file, the field and the value."""
