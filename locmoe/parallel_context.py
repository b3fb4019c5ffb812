"""ParallelContext: how this process takes part in a parallel run."""
from dataclasses import dataclass

from locmoe.topology import Topology


@dataclass(frozen=True)
class ParallelContext:
    """topology: this rank's place in the cluster (Topology.rank is this process).
    backend: 'native' (HCCL ops, Ascend) or 'emulated' (built from AllReduce, CPU).
    distributed: True when collectives really run (msrun / rank table); False for a
    single process, possibly posing as one rank of a virtual cluster (no communication).
    """

    topology: Topology
    backend: str = "emulated"
    distributed: bool = False

    @property
    def tp(self):
        return self.topology.tp if self.distributed else 1

    @property
    def ep(self):
        return self.topology.ep if self.distributed else 1

    @property
    def tp_rank(self):
        return self.topology.tp_rank() if self.distributed else 0

    @property
    def ep_rank(self):
        return self.topology.ep_rank() if self.distributed else 0


def single_process_context(topology):
    return ParallelContext(topology=topology, backend="emulated", distributed=False)
