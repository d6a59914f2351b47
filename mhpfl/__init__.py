"""mhpfl-bench: model-heterogeneous personalized federated learning, measured.

Import layout:
  mhpfl.datasets   real dataset loaders and federated partitions
  mhpfl.models     the CNN-1..CNN-5 model zoo
  mhpfl.methods    the Method interface, the registry and the built-in methods
  mhpfl.engine     the round loop, shared training helpers, byte and FLOP meters
  mhpfl.benchmark  suites, reports and the regression check
"""
__version__ = "0.1.0"
