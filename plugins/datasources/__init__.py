"""Data-layer sources and extractors: where endpoint metrics and model lists come from."""

from __future__ import annotations

from llmepp.framework.plugin import Plugin
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor
from llmepp.plugins.datasources.endpoint_notification import EndpointNotificationSource
from llmepp.plugins.datasources.metrics_source import MetricsDataSource
from llmepp.plugins.datasources.models_source import ModelsDataExtractor, ModelsDataSource

PLUGINS: list[type[Plugin]] = [
    MetricsDataSource,
    CoreMetricsExtractor,
    EndpointNotificationSource,
    ModelsDataSource,
    ModelsDataExtractor,
]

__all__ = [
    "PLUGINS",
    "CoreMetricsExtractor",
    "EndpointNotificationSource",
    "MetricsDataSource",
    "ModelsDataExtractor",
    "ModelsDataSource",
]
