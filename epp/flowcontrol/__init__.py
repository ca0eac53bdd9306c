"""Flow control: priority bands, fairness between tenants, saturation-gated dispatch.

Entry point: `build_admission` (config.py) → the `Pipeline.admission` controller, either
`LegacyAdmission` (no `flowControl` feature gate) or `FlowController`. Policies and
detectors are plugins (`llmepp.plugins.flowcontrol`) implementing `interfaces`.
"""

from llmepp.flowcontrol.interfaces import AdmissionController

__all__ = ["AdmissionController"]
