"""The decode-side P/D routing sidecar (`epp-pd-sidecar`); see `llmepp.sidecar.proxy`."""

from llmepp.sidecar.proxy import PREFILL_HEADER, Sidecar, SidecarOptions

__all__ = ["PREFILL_HEADER", "Sidecar", "SidecarOptions"]
