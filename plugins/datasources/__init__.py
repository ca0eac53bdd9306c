"""Data-layer sources and extractors: where endpoint metrics come from."""

from __future__ import annotations

from llmepp.framework.plugin import Plugin
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor
from llmepp.plugins.datasources.endpoint_notification import EndpointNotificationSource
from llmepp.plugins.datasources.metrics_source import MetricsDataSource

PLUGINS: list[type[Plugin]] = [MetricsDataSource, CoreMetricsExtractor, EndpointNotificationSource]

__all__ = ["PLUGINS", "CoreMetricsExtractor", "EndpointNotificationSource", "MetricsDataSource"]
