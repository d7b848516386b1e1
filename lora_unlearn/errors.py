"""The one exception type a user sees.

Anything raised as :class:`UserError` is the user's to fix (a missing file, a bad number, an
adapter of another base). The CLI prints its message on one line and exits with code 2; every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do next.

    The message is kept to one line: line breaks that arrive inside it (a file name or a
    config value holding one) are shown escaped, as ``\\n``.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))
