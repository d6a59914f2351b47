"""FedAvg (McMahan et al. 2017): one global model, averaged weighted by sample counts.

Homogeneous zoo only: averaging needs every client to hold the same architecture.
Personalized accuracy is that of the client's copy after its last local update.
"""
import torch.nn.functional as F

from mhpfl.engine import weighted_average
from mhpfl.methods.base import Method
from mhpfl.models import zoo_archs


class FedAvg(Method):
    name = "fedavg"
    description = "global model averaged weighted by samples (homogeneous zoo only; reference)"
    zoos = ("homo",)

    # client: keeps its copy of the model; trains it from the received global weights
    def client_update(self, client, message, phase):
        client.model.load_state_dict(message)
        client.fit(client.model.parameters(), lambda x, y: F.cross_entropy(client.model(x), y))
        return dict(client.model.state_dict())

    # server: the global model
    def init_server(self, server):
        server.state["global"] = dict(server.new_model(zoo_archs(server.cfg.zoo, 1)[0]).state_dict())

    def server_message(self, server, cid, phase):
        return server.state["global"]

    def aggregate(self, server, uploads, phase):
        if uploads:
            server.state["global"] = weighted_average(uploads)
