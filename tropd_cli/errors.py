"""The one exception type for user errors: caught once in the CLI and printed as a single line."""


class TropdError(Exception):
    """A problem with the user's input or environment (not a bug): printed without a traceback."""


class Interrupted(TropdError):
    """Ctrl-C during long work: what was done so far is saved; the CLI exits with code 130."""
