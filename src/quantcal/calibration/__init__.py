"""Calibration error and its repair: metrics (pure functions of logits), recalibrators,
where they are fitted (``recal_splits``) and diagnostics of why a repair fails."""
