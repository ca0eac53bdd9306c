from llmepp.framework.plugin import Plugin
from llmepp.plugins.profile_handlers.always_disagg_decider import AlwaysDisaggPDDecider
from llmepp.plugins.profile_handlers.always_disagg_multimodal_decider import AlwaysDisaggMultimodalDecider
from llmepp.plugins.profile_handlers.data_parallel import DataParallelProfileHandler
from llmepp.plugins.profile_handlers.disagg import DisaggProfileHandler
from llmepp.plugins.profile_handlers.header import HeaderProfileHandler
from llmepp.plugins.profile_handlers.legacy_pd import DisaggHeadersHandler, PdProfileHandler, PrefillHeaderHandler
from llmepp.plugins.profile_handlers.prefix_based_decider import PrefixBasedPDDecider
from llmepp.plugins.profile_handlers.single import SingleProfileHandler

PLUGINS: list[type[Plugin]] = [
    SingleProfileHandler,
    DisaggProfileHandler,
    HeaderProfileHandler,
    PrefixBasedPDDecider,
    AlwaysDisaggPDDecider,
    AlwaysDisaggMultimodalDecider,
    PdProfileHandler,
    DisaggHeadersHandler,
    PrefillHeaderHandler,
    DataParallelProfileHandler,
]
