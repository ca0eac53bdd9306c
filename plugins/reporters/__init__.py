"""Reporters: response-side plugins that tell the client (or the gateway) about its request."""

from llmepp.framework.plugin import Plugin
from llmepp.plugins.reporters.request_attribute import RequestAttributeReporter
from llmepp.plugins.reporters.served_endpoint import DestinationEndpointServed, DestinationEndpointServedVerifier

PLUGINS: list[type[Plugin]] = [RequestAttributeReporter, DestinationEndpointServed, DestinationEndpointServedVerifier]
