"""The engine: one round loop, one training helper, one set of meters, shared by all methods."""
from mhpfl.engine.aggregate import weighted_average
from mhpfl.engine.context import Client, Server
from mhpfl.messages import Upload
from mhpfl.engine.meter import FlopMeter, forward_flops, message_bytes
from mhpfl.engine.runner import TIMING_FIELDS, Federation, Recorder, client_step, evaluate, evaluate_client, run

__all__ = ["Client", "Server", "Upload", "FlopMeter", "forward_flops", "message_bytes",
           "weighted_average", "TIMING_FIELDS", "Federation", "Recorder", "client_step", "evaluate", "evaluate_client", "run"]
