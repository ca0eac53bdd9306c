"""An example out-of-tree plugin package for llm-epp (see README.md)."""

from epp_plugin_example.kv_headroom import KVHeadroomScorer

__all__ = ["KVHeadroomScorer"]
