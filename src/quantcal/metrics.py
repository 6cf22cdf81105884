"""``quantcal.metrics``: the stable public name of the module it re-exports (see there)."""

from quantcal.calibration.metrics import *  # noqa: F403
from quantcal.calibration.metrics import __all__  # noqa: F401
