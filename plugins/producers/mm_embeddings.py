"""`mm-embeddings-cache-producer` and `mm-embeddings-cache-scorer`: encoder-cache affinity.

A model server (or an E/P/D encoder pod) keeps the embeddings of the images, video and audio it
has encoded; a request repeating the same media (the next turn of a conversation about a
picture, many questions about one document) skips the encoder where they are cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import ENCODER_CACHE_MATCH_INFO, EncoderCacheMatchInfo, scoped
from llmepp.framework.plugin import PluginContext, PluginParams, reference_default
from llmepp.framework.requestcontrol import DataProducer, PreRequest
from llmepp.framework.scheduling import SchedulingResult, Scorer, ScorerCategory
from llmepp.request.types import InferenceRequest

MB_PER_ITEM = 2  # the reference's sizing: one cached embedding counts as 2 MB


class MMEmbeddingsCacheProducer(DataProducer, PreRequest):
    """Per endpoint, an LRU of the media items (llmepp.request.parsers: a hash of each image / video /
    audio / document as sent) routed there, and per request how many of its items each endpoint holds:

        matched(e) = |items(request) ∩ lru(e)|        (EncoderCacheMatchInfo, total = |items|; unique items)

    PreRequest records the items on the endpoint that encodes them: the pick of the profile named
    `encodeProfile` when it ran (E/P/D), else the primary pick. Capacity per endpoint =
    cacheSizeInMBPerServer / 2 entries, at least 1 (4096 MB: 2,048 items; ≤ 0 means 4096, as in the
    reference), least recently used evicted; removed endpoints are forgotten. Parameters:
    `cacheSizeInMBPerServer` (4096), `encodeProfile` ("encode").
    """

    type = "mm-embeddings-cache-producer"
    produces = frozenset({ENCODER_CACHE_MATCH_INFO})

    class Params(PluginParams):
        cache_size_in_mb_per_server: int = msgspec.field(default=4096, name="cacheSizeInMBPerServer")
        encode_profile: str = "encode"

        def __post_init__(self) -> None:
            if self.cache_size_in_mb_per_server <= 0:
                self.cache_size_in_mb_per_server = reference_default(
                    "mm-embeddings-cache-producer", "cacheSizeInMBPerServer", self.cache_size_in_mb_per_server,
                    4096, "not > 0",
                )  # fmt: skip

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        # At least one entry (the reference's lruCapacityFromCacheSizeMB: a 1 MiB budget holds one).
        self.capacity = max(1, params.cache_size_in_mb_per_server // MB_PER_ITEM)
        self.key = scoped(ENCODER_CACHE_MATCH_INFO, self.name)
        self.lrus: dict[Endpoint, OrderedDict[int, None]] = {}

    def setup(self, ctx: PluginContext) -> None:
        if ctx.datastore is not None:
            ctx.datastore.add_listener(self)

    # -- DatastoreListener -----------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        pass

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.lrus.pop(endpoint, None)

    # -- DataProducer / PreRequest -----------------------------------------------------------
    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if not request.mm_items:
            return
        # Unique items, as the reference: an image repeated in a later turn is encoded (and counts) once.
        items = dict.fromkeys(request.mm_items)
        matched: dict[Endpoint, int] = {}
        for ep in endpoints:
            lru = self.lrus.get(ep)
            if lru:
                n = sum(1 for item in items if item in lru)
                if n:
                    matched[ep] = n
        request.data[self.key] = EncoderCacheMatchInfo(total=len(items), matched=matched)

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        items = request.mm_items
        if not items:
            return
        encode = result.profiles.get(self.params.encode_profile)
        targets = encode.targets if encode is not None and encode.targets else result.targets
        if not targets:
            return
        ep = targets[0]
        lru = self.lrus.get(ep)
        if lru is None:
            if ep.removed:
                # Removed while this request was scheduled: its removal was notified already, so
                # an LRU made now would never be dropped.
                return
            lru = self.lrus[ep] = OrderedDict()
        for item in items:
            lru[item] = None
            lru.move_to_end(item)
        while len(lru) > self.capacity:
            lru.popitem(last=False)


class MMEmbeddingsCacheScorer(Scorer):
    """score(e) = matched(e) / total media items of the request (EncoderCacheMatchInfo of
    `mm-embeddings-cache-producer`, auto-created when none is configured); 0 everywhere for a
    request without media. Parameters: `producerName` (which producer to read; default the only one).
    """

    type = "mm-embeddings-cache-scorer"
    category = ScorerCategory.AFFINITY
    consumes = frozenset({ENCODER_CACHE_MATCH_INFO})

    class Params(PluginParams):
        producer_name: str = ""

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.data_key = ""

    def setup(self, ctx: PluginContext) -> None:
        self.data_key = ctx.producer_key(self, ENCODER_CACHE_MATCH_INFO, self.params.producer_name, "producerName")

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        info: EncoderCacheMatchInfo | None = request.data.get(self.data_key)
        if info is None or not info.total or not info.matched:
            return [0.0] * len(endpoints)
        matched, total = info.matched, float(info.total)
        return [matched.get(ep, 0) / total for ep in endpoints]
