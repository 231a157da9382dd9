"""The one exception type for a user's mistake: the CLI prints its message as one sentence and exits 2."""


class FastsoftError(Exception):
    """A problem with the user's input or setup, stated in one sentence (no traceback is shown)."""
