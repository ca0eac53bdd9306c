"""Data-layer sources and extractors: where endpoint metrics and model lists come from."""

from __future__ import annotations

from llmepp.framework.plugin import Plugin
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor
from llmepp.plugins.datasources.dcgm import DcgmDataSource, DcgmExtractor
from llmepp.plugins.datasources.endpoint_notification import EndpointNotificationSource
from llmepp.plugins.datasources.k8s_notification import K8sNotificationSource
from llmepp.plugins.datasources.metrics_source import MetricsDataSource
from llmepp.plugins.datasources.models_source import ModelsDataExtractor, ModelsDataSource
from llmepp.plugins.datasources.multicluster import MulticlusterMetricsDataSource, MulticlusterMetricsExtractor
from llmepp.plugins.datasources.topology import TopologyExtractor

PLUGINS: list[type[Plugin]] = [
    MetricsDataSource,
    CoreMetricsExtractor,
    EndpointNotificationSource,
    ModelsDataSource,
    ModelsDataExtractor,
    DcgmDataSource,
    DcgmExtractor,
    TopologyExtractor,
    K8sNotificationSource,
    MulticlusterMetricsDataSource,
    MulticlusterMetricsExtractor,
]

__all__ = [
    "PLUGINS",
    "CoreMetricsExtractor",
    "DcgmDataSource",
    "DcgmExtractor",
    "EndpointNotificationSource",
    "K8sNotificationSource",
    "MetricsDataSource",
    "ModelsDataExtractor",
    "ModelsDataSource",
    "MulticlusterMetricsDataSource",
    "MulticlusterMetricsExtractor",
    "TopologyExtractor",
]
