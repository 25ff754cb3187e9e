"""L∞ projected gradient descent in [0, 1] pixel space, generic over the objective, and its worst case.

`pgd_linf` maximises any per-sample differentiable objective, so the same function serves training
(inliers: maximise CE; outliers: maximise the OE loss) and evaluation (attack any OOD score, e.g.
`objective = lambda x: -msp(model(x))` pushes inliers to look OOD).

`pgd_worst_case` is the evaluation's attack: per image, the worst served score over several objectives
(the score, log-MSP, the logit margin, cross-entropy to uniform) and random restarts, keeping the best
iterate of every run (not the last), on the 8-bit grid the service's inputs live on. Each (objective,
restart) run draws from its own seeded generator, so the ensemble is, image by image, never weaker than
any of its members run alone.

The objective closes over the model; this module never touches the model's mode and differentiates
with `torch.autograd.grad` w.r.t. the input only, so no `.grad` is left on any parameter.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Objective = Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) in [0, 1] -> (N,) losses to maximise


@dataclass(frozen=True)
class AttackConfig:
    eps: float  # L∞ radius, pixel units in [0, 1] (1/255 = one grey level)
    steps: int  # number of sign-gradient steps
    step_size: float  # pixel units per step
    random_start: bool = False  # uniform start in the ε-ball (off in the paper's training attack)
    # worst-case evaluation (pgd_worst_case): objectives tried, restarts of each (the first without a random
    # start unless random_start), best iterate kept. objectives=() means plain last-iterate PGD on the score.
    objectives: tuple[str, ...] = ()
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.eps < 0 or self.step_size < 0 or self.steps < 0 or self.restarts < 1:
            raise ValueError(f"attack eps, steps and step_size must be >= 0 and restarts >= 1, got {self}")

    @property
    def worst_case(self) -> bool:
        return bool(self.objectives)


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


# -- worst case -----------------------------------------------------------------------------------------------

# (N, C, H, W) -> (value the defender cares about, {objective name: per-sample value}), both (N,), from ONE
# forward pass. Higher = more in-distribution for all of them.
ScoredForward = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _snap(x: torch.Tensor, grid: float | None) -> torch.Tensor:
    return x if not grid else torch.round(x / grid) * grid


def pgd_worst_case(
    scored_forward: ScoredForward,
    x: torch.Tensor,
    *,
    direction: float,
    objectives: Sequence[str],
    eps: float,
    steps: int,
    step_size: float,
    restarts: int = 1,
    random_start: bool = False,
    seed: int = 0,
    grid: float | None = 1 / 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worst case of the served score over objectives x restarts, best iterate kept. Returns (x_adv, score).

    `direction` = -1 pushes the score down (in-distribution images made to look OOD), +1 up (OOD images
    made to look in-distribution). Every iterate is scored, the starting point included, and per image the
    iterate with the worst score (lowest for -1, highest for +1) wins. Restart r of objective o starts at
    x (r = 0, unless random_start) or at a uniform point of the ε-ball on the grid, drawn from a generator
    seeded by (seed, o, r) alone — so adding objectives or restarts can only make the result worse for
    the defender, image by image. `grid` (1/255) keeps every iterate on the 8-bit levels a decoded
    upload can take; ε and the step should be multiples of it.
    """
    x = x.detach()
    lower = torch.clamp(x - eps, min=0.0)
    upper = torch.clamp(x + eps, max=1.0)
    with torch.no_grad():
        best_score, _ = scored_forward(x)
    best_x, best_score = x.clone(), best_score.detach().clone()

    def keep_worse(candidate: torch.Tensor, score: torch.Tensor) -> None:
        better = direction * score > direction * best_score  # worse for the defender
        if better.any():
            best_x[better] = candidate[better]
            best_score[better] = score[better]

    for objective in objectives:
        for restart in range(restarts):
            if eps <= 0 or steps <= 0:
                break
            if restart > 0 or random_start:
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(objective.encode()) * 101 + restart)
                noise = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                x_adv = torch.minimum(torch.maximum(_snap(x + (2 * noise - 1) * eps, grid), lower), upper)
            else:
                x_adv = x.clone()
            for step in range(steps + 1):
                x_adv.requires_grad_(step < steps)
                with torch.set_grad_enabled(step < steps):
                    score, values = scored_forward(x_adv)
                if step > 0 or restart > 0 or random_start:
                    keep_worse(x_adv.detach(), score.detach())
                if step == steps:
                    break
                (grad,) = torch.autograd.grad((direction * values[objective]).sum(), x_adv)
                x_adv = _snap(x_adv.detach() + step_size * grad.sign(), grid)
                x_adv = torch.minimum(torch.maximum(x_adv, lower), upper)
    return best_x.detach(), best_score.detach()
