"""The one exception type for user errors: caught once in the CLI and printed as a single line."""


class TropdError(Exception):
    """A problem with the user's input or environment (not a bug): printed without a traceback."""


class Interrupted(TropdError):
    """Ctrl-C during long work: what was done so far is saved; the CLI exits with code 130."""


class TeacherUnavailable(TropdError):
    """A served teacher did not answer after its retries (or answered wrongly) in the middle of a run."""


class WriteError(TropdError):
    """A file could not be written (full disk, file-size limit, permissions): the CLI exits with code 1."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"cannot write {what}: {reason}")
        self.what, self.reason = what, reason


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
