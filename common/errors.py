"""The one exception type for mistakes in user input.

Entry points catch :class:`UserError` and print its message as a single line on
stderr (no traceback), so every message must say what was wrong and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: a name, a value, a file or a directory."""
