"""``quantcal.data``: the stable public name of the module it re-exports (see there)."""

from quantcal.training.data import *  # noqa: F403
from quantcal.training.data import __all__  # noqa: F401
