"""``quantcal.recal``: the stable public name of the module it re-exports (see there)."""

from quantcal.calibration.recal import *  # noqa: F403
from quantcal.calibration.recal import __all__  # noqa: F401
