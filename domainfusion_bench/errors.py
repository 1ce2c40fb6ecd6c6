"""User-facing errors: one class, so the CLI can print them as one clear line instead of a traceback."""


class DfbenchError(Exception):
    """Bad input or environment. The message says what is wrong and what to do."""
