"""Errors a user can fix. The CLI prints them as one line, never as a traceback."""
import argparse
import difflib
import signal
from typing import NoReturn


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


def did_you_mean(word: str, known: list[str]) -> str:
    """' (did you mean X?)' naming the known words closest to a misspelt one, or ''."""
    close = difflib.get_close_matches(word, known, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, not the whole usage block: the message, the
    nearest options to a misspelt one, and the command that lists them (`see`, default PROG --help)."""

    def __init__(self, *args, see: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.see = see

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments: "):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for word in message.split(": ", 1)[1].split():
                if word.startswith("--") and (hint := did_you_mean(word.split("=")[0], known)):
                    break
        self.exit(2, f"{self.prog}: error: {message}{hint}; see '{self.see or self.prog + ' --help'}'\n")
