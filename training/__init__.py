"""Offline half of oodguard (torch): data, models, attacks, losses, trainer, evaluation, export, calibration."""
