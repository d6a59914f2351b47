"""Errors a user can fix. The CLI prints them as one line, never as a traceback."""
import signal


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the work in flight stops. A KeyboardInterrupt, so that no
    `except Exception` (a run's failure handling) swallows it; the CLI prints its message as one
    line and exits with 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message

    @classmethod
    def of(cls, e: KeyboardInterrupt, message: str) -> "Interrupted":
        """The same interruption (its signal; SIGINT for a plain Ctrl-C) told with `message`."""
        return cls(getattr(e, "signum", signal.SIGINT), message)
