from llmepp.framework.plugin import Plugin
from llmepp.plugins.profile_handlers.single import SingleProfileHandler

PLUGINS: list[type[Plugin]] = [SingleProfileHandler]
