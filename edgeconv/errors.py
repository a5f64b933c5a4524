"""The one error type users see: what is wrong, and what to do about it."""


class EdgeconvError(Exception):
    """A problem with the user's input or environment, reported as one line.

    `problem` says what is wrong, `hint` what to do next. The CLI prints
    ``error: <problem>; <hint>`` and exits with status 2; library callers get
    the exception and can read both parts.
    """

    def __init__(self, problem: str, hint: str = ""):
        self.problem = problem
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        text = self.problem if not self.hint else f"{self.problem}; {self.hint}"
        # One line, whatever the parts held.
        return " ".join(text.split())
