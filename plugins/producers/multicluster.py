"""`multicluster-approx-prefix-cache-producer`: approx-prefix-cache-producer over clusters."""

from __future__ import annotations

from llmepp.datalayer.multicluster import PREFIX_PRODUCER_TYPE
from llmepp.plugins.producers.approx_prefix import ApproxPrefixCacheProducer


class MulticlusterApproxPrefixCacheProducer(ApproxPrefixCacheProducer):
    """approx-prefix-cache-producer with clusters as the endpoints (a hub EPP): it remembers which
    cluster each prompt's blocks were routed to, unchanged (reference: a pure delegation).

    Parameters and defaults are approx-prefix-cache-producer's. Two of them read differently here:
    `lruCapacityPerServer` (31250 blocks) is per cluster, so size it to a cluster's total KV capacity in
    blocks; `autoTune` finds no per-pod cache geometry on a cluster, so the block size is
    `blockSizeTokens` (floor 64) and the capacity `lruCapacityPerServer`. Use the same block size as the
    clusters' EPPs so both levels split prompts alike.
    """

    type = PREFIX_PRODUCER_TYPE
