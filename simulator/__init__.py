"""vLLM-compatible model-server simulator: many simulated pods, one process, no GPU.

Public API::

    from llmepp_sim import PodConfig, SimCluster, ThreadedSimCluster, SimProcess

    async with SimCluster([PodConfig(host="127.0.0.2", port=0)], time_scale=10) as cluster:
        cluster.urls[0]  # "http://127.0.0.2:<port>"

See ``cluster.py`` for the threaded and subprocess variants and ``cli.py`` for ``epp-sim``.
"""

from llmepp_sim.cluster import PodInfo, SimCluster, SimProcess, ThreadedSimCluster
from llmepp_sim.config import LoraModule, PodConfig, SimConfig
from llmepp_sim.pod import SimPod
from llmepp_sim.profiles import list_profiles, load_profile

__all__ = [
    "LoraModule",
    "PodConfig",
    "PodInfo",
    "SimCluster",
    "SimConfig",
    "SimPod",
    "SimProcess",
    "ThreadedSimCluster",
    "list_profiles",
    "load_profile",
]
