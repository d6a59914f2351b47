"""Standalone: every client trains only its own model; nothing is communicated."""
import torch.nn.functional as F

from mhpfl.methods.base import Method


class Standalone(Method):
    name = "standalone"
    description = "each client trains its own model alone; no communication (lower reference)"

    def client_update(self, client, message, phase):
        client.fit(client.model.parameters(), lambda x, y: F.cross_entropy(client.model(x), y))
        return {}
