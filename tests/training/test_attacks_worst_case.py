"""pgd_worst_case's bookkeeping, on hand-made linear scores whose worst case is known exactly.

score(x) = w · x per image. Attacking it with direction d moves every pixel by d * sign(w) per step
(zero-weight pixels stay), clipped to the ε-ball and [0, 1], so the last iterate after k steps is
known in closed form; a misleading surrogate ("anti" = -score) moves the other way, so the worst
iterate of its runs is their starting point. Random starts are those the docstring promises: uniform
in the ε-ball, snapped to the grid, from a generator seeded by (seed, objective, restart) alone —
the exact seeding is pinned here because docs/results.md's worst-case numbers depend on it.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from oodguard.training.attacks import pgd_worst_case

G = 1 / 255
# one image of 8 pixels, as (1, 1, 1, 8); levels chosen so the [0, 1] box clips some moves
X = torch.tensor([[0, 1, 100, 254, 255, 128, 0, 255],
                  [3, 250, 7, 60, 200, 255, 255, 0],
                  [128, 128, 128, 128, 128, 128, 128, 128]], dtype=torch.float64).div(255).reshape(3, 1, 1, 8)
W = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0, 1.0, -0.5, 0.25], dtype=torch.float64)


def linear(calls: list | None = None):
    """score = w · x; surrogates: "score" itself, "anti" (its negative), "flat" (no gradient at all)."""
    def forward(z: torch.Tensor):
        if calls is not None:
            calls.append(z.detach().clone())
        s = (z.flatten(1) * W).sum(1)
        return s, {"score": s, "anti": -s, "flat": z.flatten(1).sum(1) * 0}
    return forward


def score_of(x: torch.Tensor) -> torch.Tensor:
    return (x.flatten(1) * W).sum(1)


def random_start(x, objective, restart, *, seed, eps, grid=G):
    """The documented start of restart `restart` of `objective` (independent of every other run)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(objective.encode()) * 101 + restart)
    noise = torch.rand(x.shape, generator=gen, dtype=x.dtype)
    start = x + (2 * noise - 1) * eps
    if grid:
        start = torch.round(start / grid) * grid
    return torch.minimum(torch.maximum(start, (x - eps).clamp(min=0)), (x + eps).clamp(max=1))


@pytest.mark.parametrize("direction", [-1.0, 1.0])
@pytest.mark.parametrize("eps_levels,steps", [(4, 3), (2, 3), (2, 1), (3, 5)])
def test_linear_score_reaches_the_closed_form_worst_case(direction, eps_levels, steps):
    """k steps of one grey level toward d * sign(w), at most ε, inside [0, 1]; zero-weight pixels never move."""
    eps = eps_levels * G
    x_adv, score = pgd_worst_case(linear(), X, direction=direction, objectives=("score",), eps=eps, steps=steps,
                                  step_size=G, restarts=1)
    move = direction * torch.sign(W) * min(steps, eps_levels) * G
    expected = (X + move).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(score, score_of(expected), rtol=0, atol=1e-12)
    assert torch.all(direction * score > direction * score_of(X))  # strictly worse for every image
    assert not x_adv.requires_grad and not score.requires_grad


def test_every_step_and_the_start_are_scored_once_and_no_more():
    """One clean pass, then the start and each of the `steps` iterates of every (objective, restart) run."""
    calls: list = []
    pgd_worst_case(linear(calls), X, direction=-1.0, objectives=("score", "anti"), eps=2 * G, steps=3, step_size=G,
                   restarts=2)
    assert len(calls) == 1 + 2 * 2 * (3 + 1)
    torch.testing.assert_close(calls[0], X, rtol=0, atol=0)


@pytest.mark.parametrize("eps,steps", [(0.0, 3), (2 * G, 0)])
def test_no_budget_returns_the_clean_image_after_one_pass(eps, steps):
    """ε = 0 or no steps: the clean image and its score, after the clean forward pass only, even with random starts."""
    calls: list = []
    x_adv, score = pgd_worst_case(linear(calls), X, direction=-1.0, objectives=("score", "anti"), eps=eps, steps=steps,
                                  step_size=G, restarts=3, random_start=True)
    assert len(calls) == 1
    assert torch.equal(x_adv, X) and x_adv is not X
    torch.testing.assert_close(score, score_of(X), rtol=0, atol=0)


def test_ties_keep_the_earliest_iterate():
    """A score the attack cannot change: every iterate ties with the clean image, which is returned."""
    def forward(z):
        s = (z.flatten(1) * W).sum(1)
        return s * 0, {"score": s}  # the surrogate moves the image, the served score stays 0
    x_adv, score = pgd_worst_case(forward, X, direction=-1.0, objectives=("score",), eps=3 * G, steps=3, step_size=G,
                                  restarts=3, random_start=True)
    assert torch.equal(x_adv, X)
    assert torch.equal(score, torch.zeros(3, dtype=X.dtype))


def _worst_of(candidates: list[torch.Tensor], direction: float) -> torch.Tensor:
    """Per image, the first candidate with the worst score."""
    best = candidates[0].clone()
    for c in candidates[1:]:
        worse = direction * score_of(c) > direction * score_of(best)
        best[worse] = c[worse]
    return best


@pytest.mark.parametrize("random_start_first", [False, True])
@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_random_restarts_start_where_documented_and_their_start_is_kept(random_start_first, direction):
    """With the misleading surrogate every step helps the defender, so per image the result is the worst of the
    clean image and the random starts: restart 0 starts at x (unless random_start), restart r > 0 at the
    documented uniform grid point of the ε-ball."""
    x = X.repeat(4, 1, 1, 1)  # 12 images: some random starts are worse than x, some better
    eps, seed, restarts = 6 * G, 5, 3
    x_adv, score = pgd_worst_case(linear(), x, direction=direction, objectives=("anti",), eps=eps, steps=2, step_size=G,
                                  restarts=restarts, random_start=random_start_first, seed=seed)
    starts = [random_start(x, "anti", r, seed=seed, eps=eps) for r in range(restarts)]
    if not random_start_first:
        starts = starts[1:]
    expected = _worst_of([x, *starts], direction)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(score, score_of(expected), rtol=0, atol=1e-12)
    # the case is not trivial: some images keep x, some a random start
    from_start = (x_adv != x).flatten(1).any(1)
    assert 0 < from_start.sum() < len(x)


def test_defaults_are_one_restart_seed_zero_and_the_8_bit_grid():
    x = X.repeat(4, 1, 1, 1)
    eps = 6 * G
    got, _ = pgd_worst_case(linear(), x, direction=-1.0, objectives=("anti",), eps=eps, steps=1, step_size=G,
                            random_start=True)  # restarts=1, seed=0, grid=1/255
    torch.testing.assert_close(got, _worst_of([x, random_start(x, "anti", 0, seed=0, eps=eps)], -1.0), rtol=0, atol=1e-12)
    calls: list = []
    pgd_worst_case(linear(calls), x, direction=-1.0, objectives=("anti",), eps=eps, steps=1, step_size=G)
    assert len(calls) == 1 + 2  # one restart: the clean pass, the start and one step
    _, clean = pgd_worst_case(linear(), x, direction=-1.0, objectives=("anti",), eps=eps, steps=1, step_size=G)
    torch.testing.assert_close(clean, score_of(x), rtol=0, atol=0)  # no random restart: the anti steps only help


def test_iterates_are_snapped_to_the_grid_and_not_without_one():
    """A step of 1.5 levels lands between levels: snapped onto one with the grid, left there with grid=None."""
    kw = dict(direction=-1.0, objectives=("score",), eps=4 * G, steps=1, step_size=1.5 * G, restarts=1)
    snapped, _ = pgd_worst_case(linear(), X, **kw)
    levels = snapped * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-9)
    assert not torch.equal(snapped, X)
    free, _ = pgd_worst_case(linear(), X, grid=None, **kw)
    torch.testing.assert_close(free, (X - torch.sign(W) * 1.5 * G).clamp(0, 1), rtol=0, atol=1e-12)


def test_random_starts_without_a_grid_are_the_raw_uniform_draws():
    x = X.repeat(2, 1, 1, 1)
    eps = 5.5 * G
    got, _ = pgd_worst_case(linear(), x, direction=1.0, objectives=("flat",), eps=eps, steps=1, step_size=G,
                            random_start=True, seed=2, grid=None)
    start = random_start(x, "flat", 0, seed=2, eps=eps, grid=None)
    torch.testing.assert_close(got, _worst_of([x, start], 1.0), rtol=0, atol=1e-12)
    assert not torch.equal(got, x)
