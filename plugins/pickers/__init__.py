from llmepp.framework.plugin import Plugin
from llmepp.plugins.pickers.max_score import MaxScorePicker
from llmepp.plugins.pickers.random_picker import RandomPicker
from llmepp.plugins.pickers.weighted_random import WeightedRandomPicker

PLUGINS: list[type[Plugin]] = [MaxScorePicker, RandomPicker, WeightedRandomPicker]
