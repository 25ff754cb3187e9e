"""The worst-case evaluation attack: never weaker than any of its members, image by image; stays in the
ε-ball, in [0, 1] and on the 8-bit grid; keeps the best iterate, not the last."""

from __future__ import annotations

import pytest
import torch

from oodguard.training.attacks import pgd_linf, pgd_worst_case
from oodguard.training.scores import WORST_CASE_OBJECTIVES, ScoreContext, scored_forward

from ._eval_helpers import float_images, tiny_model

torch.set_num_threads(1)
EPS, STEPS, STEP = 2 / 255, 5, 1 / 255


def _run(model, x, direction, objectives, restarts=2, score="msp"):
    return pgd_worst_case(scored_forward(model, score, ScoreContext()), x, direction=direction,
                          objectives=objectives, eps=EPS, steps=STEPS, step_size=STEP, restarts=restarts, seed=3)


@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_ensemble_is_never_weaker_than_any_member(direction):
    model = tiny_model()
    x = float_images(24, seed=5)
    _, ensemble = _run(model, x, direction, WORST_CASE_OBJECTIVES)
    for member in WORST_CASE_OBJECTIVES:
        _, alone = _run(model, x, direction, (member,))
        # image by image, the ensemble's score is at least as bad for the defender as the member's
        assert torch.all(direction * ensemble >= direction * alone - 1e-7), member
    # and strictly worse than the clean score for most images
    with torch.no_grad():
        clean = scored_forward(model, "msp", ScoreContext())(x)[0]
    assert (direction * ensemble > direction * clean).float().mean() > 0.8


def test_more_restarts_never_help_the_defender():
    model = tiny_model()
    x = float_images(16, seed=6)
    _, one = _run(model, x, -1.0, ("score",), restarts=1)
    _, three = _run(model, x, -1.0, ("score",), restarts=3)
    assert torch.all(three <= one + 1e-7)


def test_stays_in_ball_box_and_grid_and_reports_the_score_of_what_it_returns():
    model = tiny_model()
    x = float_images(16, seed=7)
    x_adv, score = _run(model, x, 1.0, WORST_CASE_OBJECTIVES, score="energy")
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    levels = x_adv * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # an image a client could upload
    with torch.no_grad():
        assert torch.allclose(scored_forward(model, "energy", ScoreContext())(x_adv)[0], score, atol=1e-5)


def test_best_iterate_is_at_least_as_bad_as_the_last_iterate():
    model = tiny_model()
    x = float_images(16, seed=8)
    objective = lambda z: -scored_forward(model, "msp", ScoreContext())(z)[0]  # noqa: E731
    last = pgd_linf(objective, x, eps=EPS, steps=STEPS, step_size=STEP)
    with torch.no_grad():
        last_score = scored_forward(model, "msp", ScoreContext())(last)[0]
    _, best = pgd_worst_case(scored_forward(model, "msp", ScoreContext()), x, direction=-1.0, objectives=("score",),
                             eps=EPS, steps=STEPS, step_size=STEP, restarts=1)
    assert torch.all(best <= last_score + 1e-6)
