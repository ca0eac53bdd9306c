"""Responders: requests the EPP answers itself (and the screening that goes with them)."""

from llmepp.framework.plugin import Plugin
from llmepp.plugins.responders.models import ModelsResponder

PLUGINS: list[type[Plugin]] = [ModelsResponder]
