"""The one interface every federated method implements.

A method object holds only hyperparameters; all state lives in the contexts the engine hands
it, so the same class can run in one process (our engine) or split over machines (Flower):

- client side: `init_client` sets up what a client keeps (`client.state`, `client.model`);
  `client_update` receives the server's message for a phase, trains locally with the engine's
  shared helpers (`client.fit`, ...) and returns the upload; `predict` is the client's
  personalized prediction.
- server side: `init_server` sets up `server.state`; `server_message` is what the server sends to
  one participant before a phase; `aggregate` receives the uploads (with sample counts).

A round runs every phase in `phases` in order: message down, client update, upload, aggregate.
Messages are plain `dict[str, torch.Tensor]`; the engine counts their bytes exactly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from mhpfl.messages import Message, Upload

if TYPE_CHECKING:  # torch only in annotations: `mhpfl list` and `--help` must not import it
    import torch

    from mhpfl.engine.context import Client, Server


@dataclass(frozen=True)
class Option:
    """A method hyperparameter: exposed as `--name` on `mhpfl run METHOD`."""

    default: Any
    help: str
    choices: Sequence[Any] | None = None
    type: Callable[[str], Any] | None = None  # parser for the CLI; default: type(default)
    interval: str | None = None  # allowed numbers in interval notation: "[0, 1]", "(0, inf)", ...

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed ("must be ..."), or None when it is."""
        kind = type(self.default) if self.type is None else None  # a suite file can give any type
        if kind in KINDS and not KINDS[kind][0](value):
            return f"must be {KINDS[kind][1]}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if self.interval is not None and not in_interval(value, self.interval):
            return f"must be in {self.interval}"
        return None

    def parse(self, text: str) -> Any:
        if self.type is not None:
            return self.type(text)
        if isinstance(self.default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got '{text}'")
        return type(self.default)(text) if self.default is not None else text


KINDS: dict[type, tuple[Callable[[Any], bool], str]] = {  # an option's default type: what else it takes
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def in_interval(value: Any, interval: str) -> bool:
    """Whether number `value` lies in `interval`, written "[lo, hi]" with ( or ) for an open end
    and inf for no bound (NaN lies in none)."""
    lo, hi = (float(t) for t in interval[1:-1].split(","))
    try:
        v = float(value)
    except (TypeError, ValueError):  # e.g. a string from a suite file: not a number at all
        return False
    return ((lo <= v if interval[0] == "[" else lo < v)
            and (v <= hi if interval[-1] == "]" else v < hi))


class Method(ABC):
    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown by `mhpfl list`
    version: ClassVar[str] = "1"  # bump when results change; part of a benchmark run's key
    options: ClassVar[dict[str, Option]] = {}
    phases: ClassVar[tuple[str, ...]] = ("round",)
    zoos: ClassVar[tuple[str, ...]] = ("hetero", "homo")  # model zoos the method supports
    eval_heads: ClassVar[tuple[str, ...]] = ("model",)  # first one is the reported accuracy
    # data beyond the clients' private sets that the method uses (None: none). Tables mark such
    # methods, and the headline compares pFedLoRA with the baselines that use no extra data.
    extra_data: ClassVar[str | None] = None

    def __init__(self, **opts: Any):
        from mhpfl.errors import UserError

        unknown = set(opts) - set(self.options)
        if unknown:
            raise UserError(f"{self.name} has no option {', '.join(sorted(unknown))}; "
                            f"see 'mhpfl run {self.name} --help'")
        self.hp = {k: opts.get(k, o.default) for k, o in self.options.items()}
        for k, o in self.options.items():
            why = o.problem(self.hp[k])
            if why is not None:
                raise UserError(f"{self.name}: --{k.replace('_', '-')} {why} (got {self.hp[k]})")
        for k, v in self.hp.items():
            setattr(self, k, v)

    def validate(self, cfg, info) -> None:
        """Reject option values that cannot work with run `cfg` on dataset `info` (a
        DatasetInfo): raise UserError naming the flag and its allowed range. Called by
        RunConfig.validate, before any data is loaded; must be cheap."""

    # ---- client side -------------------------------------------------------------------
    def init_client(self, client: "Client") -> None:
        """Set up what the client keeps between rounds; runs when the client first participates
        (its work is metered in that round). Before it, the client predicts with its untouched
        model."""

    @abstractmethod
    def client_update(self, client: "Client", message: Message, phase: str) -> Message:
        """Receive the server's message, train locally, return the upload."""

    def predict(self, client: "Client", x: torch.Tensor, head: str) -> torch.Tensor:
        """Personalized class scores of `client` for inputs x (argmax is the prediction)."""
        return client.model(x)

    def predict_heads(self, client: "Client", x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's `predict` scores for inputs x, what the engine evaluates. A method whose
        heads share a forward pass overrides this to run it once (FedProto)."""
        return {h: self.predict(client, x, h) for h in self.eval_heads}

    # ---- server side -------------------------------------------------------------------
    def init_server(self, server: "Server") -> None:
        """Set up the server's state (before round 1)."""

    def server_message(self, server: "Server", cid: int, phase: str) -> Message:
        """What the server sends to participant `cid` before `phase`."""
        return {}

    def aggregate(self, server: "Server", uploads: list["Upload"], phase: str) -> None:
        """Fold the participants' uploads into the server's state."""
