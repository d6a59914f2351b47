"""The types every layer shares (the bottom of the package: it imports nothing of mhpfl).

A message is what crosses the network between server and client: a plain mapping of names to
tensors. An upload is a client's message as the server receives it, with the client's id and
training-sample count (metadata, not payload).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # torch only in annotations: the CLI's metadata commands must not import it
    import torch

Message = dict[str, "torch.Tensor"]


@dataclass
class Upload:
    cid: int
    num_samples: int  # the client's training-sample count (metadata, not counted as payload)
    message: Message


def message_bytes(message: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a message: the sum of numel x element_size over its tensors."""
    return sum(t.numel() * t.element_size() for t in message.values())
