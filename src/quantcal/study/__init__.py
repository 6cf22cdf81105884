"""The study: configuration, cells, the pipeline of stages, the cache and the run folder.

``run_study(config_or_path, out_dir)`` runs (or finishes) a study; see
``docs/architecture.md`` for the stages and where each kind of extension goes.
"""

from quantcal.study.runner import *  # noqa: F403
from quantcal.study.runner import __all__  # noqa: F401
