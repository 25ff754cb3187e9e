"""Offline half of oodguard (torch): data, architectures, attacks, losses, trainer, run directory, evaluation,
export, calibration."""
