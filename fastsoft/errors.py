"""The errors every layer may raise: a user's mistake (the CLI prints its message as one sentence and exits 2), and a
backend that cannot run here (shared by the ops' dispatch and their backends, so neither imports the other for it)."""


class FastsoftError(Exception):
    """A problem with the user's input or setup, stated in one sentence (no traceback is shown)."""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""
