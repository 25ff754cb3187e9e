"""Training losses. Each is a pure function of the logits.

The OE loss is the cross-entropy from the uniform distribution over the K classes to softmax(z):

    L_OE(z) = -(1/K) sum_k log softmax(z)_k = logsumexp(z) - mean_k z_k   (>= log K, equal iff z is uniform)

Training *minimises* it on outliers (flat predictions), the outlier attack *maximises* it (confident ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def oe_loss_per_sample(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N,) cross-entropy to the uniform distribution. Computed in float32 (AMP-safe)."""
    z = logits.float()
    return torch.logsumexp(z, dim=1) - z.mean(dim=1)


def oe_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean OE loss over the batch (a scalar)."""
    return oe_loss_per_sample(logits).mean()


def ce_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy, float32; the inlier attack's objective."""
    return F.cross_entropy(logits.float(), labels, reduction="none")
