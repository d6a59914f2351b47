"""Errors a user can fix. The CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


class NonFiniteLoss(UserError):
    """A training loss became NaN or infinite; the run stops at once."""

    def __init__(self, method: str, client: int, round_: int, value: float):
        super().__init__(
            f"{method}: loss became {value} on client {client} in round {round_}; "
            "lower --lr or check the method's options, then rerun"
        )
        self.method, self.client, self.round = method, client, round_
