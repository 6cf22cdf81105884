"""``quantcal.train``: the stable public name of the module it re-exports (see there)."""

from quantcal.training.train import *  # noqa: F403
from quantcal.training.train import __all__  # noqa: F401
