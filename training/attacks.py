"""L∞ projected gradient descent in [0, 1] pixel space, generic over the objective.

`pgd_linf` maximises any per-sample differentiable objective, so the same function serves training
(inliers: maximise CE; outliers: maximise the OE loss) and evaluation (attack any OOD score, e.g.
`objective = lambda x: -msp(model(x))` pushes inliers to look OOD).

The objective closes over the model; this module never touches the model's mode and differentiates
with `torch.autograd.grad` w.r.t. the input only, so no `.grad` is left on any parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Objective = Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) in [0, 1] -> (N,) losses to maximise


@dataclass(frozen=True)
class AttackConfig:
    eps: float  # L∞ radius, pixel units in [0, 1] (1/255 = one grey level)
    steps: int  # number of sign-gradient steps
    step_size: float  # pixel units per step
    random_start: bool = False  # uniform start in the ε-ball (off in the paper's training attack)

    def __post_init__(self) -> None:
        if self.eps < 0 or self.step_size < 0 or self.steps < 0:
            raise ValueError(f"attack eps, steps and step_size must be >= 0, got {self}")


# The paper's training attack: ε = 1/255, 2 steps of 1/255, no random start (δ stays on the 1/255 grid).
TRAIN_PAPER = AttackConfig(eps=1 / 255, steps=2, step_size=1 / 255, random_start=False)


def pgd_linf(
    objective: Objective,
    x: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return x_adv with ||x_adv - x||∞ <= eps and x_adv in [0, 1] that (locally) maximises `objective`.

    Each step: x <- proj(x + step_size * sign(∇ sum_i objective(x)_i)). With x on the 1/255 grid and
    eps = step_size = k/255, δ stays on that grid. The result is detached.
    """
    x = x.detach()
    if steps <= 0 or eps <= 0:
        return x.clone()
    lower = torch.clamp(x - eps, min=0.0)
    upper = torch.clamp(x + eps, max=1.0)
    if random_start:
        # Generators live on one device; draw there, then move.
        gen_device = generator.device if generator is not None else x.device
        noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        x_adv = torch.minimum(torch.maximum(x + (2 * noise - 1) * eps, lower), upper)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        losses = objective(x_adv)
        if losses.ndim != 1 or losses.shape[0] != x.shape[0]:
            raise ValueError(f"PGD objective must return per-sample losses of shape ({x.shape[0]},), got {tuple(losses.shape)}")
        (grad,) = torch.autograd.grad(losses.sum(), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, lower), upper)
    return x_adv.detach()


def pgd_with(config: AttackConfig, objective: Objective, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`pgd_linf` with its parameters taken from an `AttackConfig`."""
    return pgd_linf(
        objective, x, eps=config.eps, steps=config.steps, step_size=config.step_size,
        random_start=config.random_start, generator=generator,
    )
