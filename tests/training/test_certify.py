"""Certified scores (training/certify.py): the interval bound is sound on small random models of every
registered kind, tight at ε = 0, grows with ε, and refuses layers it cannot bound.

Soundness is checked twice: the score bound against the float32 score of 1,000 random points of the
ball (half of them vertices, where IBP's worst cases sit) and of PGD points that maximise the score; and,
for the PGD points and 250 of the random ones, every intermediate activation (float64 model) against its
node's box, so a wrong rule is caught even where the final bound has slack to hide it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import fx, nn

from oodguard.training.architectures import create_model
from oodguard.training.attacks import pgd_linf, pgd_worst_case
from oodguard.training.certify import (
    CLASSIFIER_CERTIFIABLE,
    Box,
    IntervalBounds,
    UnsupportedLayerError,
    _gelu,
    certify_key,
    input_box,
    score_upper_bounds,
)
from oodguard.training.scores import ScoreContext, energy, msp, scored_forward

torch.set_num_threads(1)

SCORE_FNS = {"msp": msp, "energy": energy}
# small members of every registered family; airbench is the shipped kind (GELU, max-pooling, a 2x2 stem)
SMALL_MODELS = {
    "small_cnn": {"name": "small_cnn", "widths": (4, 6, 8), "stem": 4},
    "small_cnn_maxavg": {"name": "small_cnn", "widths": (4, 6, 8), "stem": 4, "pool": "maxavg"},
    "fast_cnn": {"name": "fast_cnn", "widths": (4, 6, 8), "stem": 4},
    "airbench": {"name": "airbench", "widths": (4, 6, 8), "whiten_width": 4},
    "airbench_flip": {"name": "airbench", "widths": (4, 6, 8), "whiten_width": 4, "flip_average": True},
    "resnet18": {"name": "resnet18", "width": 2},
    "wrn40_2": {"name": "wrn40_2", "depth": 10, "widen": 1},
    "densenet100": {"name": "densenet100", "depth": 10, "growth": 3},
}
EPS = 4 / 255  # wide enough that GELU boxes straddle the minimum and BN sees both signs matter
N_RANDOM = 1000


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial eval-mode BatchNorm: running statistics away from (0, 1), scales of both signs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(0.3 + 1.7 * torch.rand(c, generator=g))
            m.weight.data.copy_(3.0 * torch.rand(c, generator=g) - 1.5)
            m.bias.data.copy_(0.6 * torch.rand(c, generator=g) - 0.3)
    return model.eval()


def _small(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _randomise_bn(create_model(**SMALL_MODELS[kind]), seed)
    with torch.no_grad():  # logits of a few units, so msp is neither flat nor saturated
        model.head.weight.mul_(4.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


def _ball(x: torch.Tensor, eps: float) -> Box:
    """The region the bound must cover, written out here rather than taken from the module under test."""
    x = x.double()
    return Box(torch.clamp(x - eps, 0.0, 1.0), torch.clamp(x + eps, 0.0, 1.0))


def _inside(points: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 points moved (by a few float32 steps at most) into the float64 ball the certifier bounds:
    the float32 rounding of x ± eps (PGD's projection) may fall just outside it."""
    box = _ball(x, eps)
    assert float((points.double() - x.double()).abs().max()) <= eps + 1e-6  # only rounding to undo
    p = torch.maximum(torch.minimum(points.double(), box.hi), box.lo).float()
    p = torch.where(p.double() < box.lo, torch.nextafter(p, torch.tensor(2.0)), p)
    p = torch.where(p.double() > box.hi, torch.nextafter(p, torch.tensor(-1.0)), p)
    assert bool(((p.double() >= box.lo) & (p.double() <= box.hi)).all())
    return p


def _ball_points(x: torch.Tensor, eps: float, n: int, seed: int) -> torch.Tensor:
    """n points of the ball around one image x (1, C, H, W): half uniform, half random vertices."""
    g = torch.Generator().manual_seed(seed)
    box = _ball(x, eps)
    u = torch.rand((n, *x.shape[1:]), generator=g, dtype=torch.float64)
    u[n // 2:] = (u[n // 2:] > 0.5).double()
    return _inside(box.lo + u * (box.hi - box.lo), x, eps)


def _activations(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's value on x, float64 copy of the model (matched to the boxes by node name)."""
    gm = fx.symbolic_trace(copy.deepcopy(model).double())
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                values[node.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(x.double())
    return values


def _assert_nodes_contain(certifier: IntervalBounds, model: nn.Module, x: torch.Tensor, points: torch.Tensor,
                          eps: float) -> None:
    boxes = certifier.node_bounds(input_box(x, eps))
    assert len(boxes) >= 5
    for chunk in points.split(200):  # float64 activations of every node: bounded memory
        values = _activations(model, chunk)
        for name, box in boxes.items():
            v = values[name]
            tol = 1e-9 * (1.0 + v.abs())
            inside = (v >= box.lo - tol) & (v <= box.hi + tol)  # one image's box broadcast over the points
            assert bool(inside.all()), f"node {name}: {int((~inside).sum())} activation(s) outside its box"


def _pgd_points(model: nn.Module, x: torch.Tensor, eps: float, score: str) -> torch.Tensor:
    """Points of the ball that push `score` up: plain PGD from a few random starts, and the evaluation's
    worst-case attack (four objectives, best iterate) off the 8-bit grid."""
    fn = SCORE_FNS[score]
    points = [pgd_linf(lambda v: fn(model(v)), x, eps=eps, steps=30, step_size=eps / 4, random_start=r > 0,
                       generator=torch.Generator().manual_seed(r)) for r in range(3)]
    x_wc, _ = pgd_worst_case(scored_forward(model, score, ScoreContext()), x, direction=1.0,
                             objectives=("score", "log_msp", "margin", "ce_uniform"), eps=eps, steps=20,
                             step_size=eps / 4, restarts=2, grid=None)
    return _inside(torch.cat([*points, x_wc]), x, eps)


@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_bound_contains_random_points(kind):
    model = _small(kind, seed=1)
    certifier = IntervalBounds(model)
    x = _images(1, seed=2)
    ub = score_upper_bounds(certifier, x, EPS, list(CLASSIFIER_CERTIFIABLE))
    points = _ball_points(x, EPS, N_RANDOM, seed=0)
    assert float((points - x).abs().max()) <= EPS + 1e-7 and points.min() >= 0 and points.max() <= 1
    with torch.no_grad():
        logits = model(points)
    for score, fn in SCORE_FNS.items():
        worst = float(fn(logits).max())
        assert worst <= float(ub[score][0]), (kind, score, worst, float(ub[score][0]))
    _assert_nodes_contain(certifier, model, x, points[::4], EPS)  # every 4th: uniform points and vertices


@pytest.mark.parametrize("kind", ["small_cnn", "fast_cnn", "airbench", "resnet18"])
@pytest.mark.parametrize("score", CLASSIFIER_CERTIFIABLE)
def test_bound_contains_pgd_points(kind, score):
    model = _small(kind, seed=3)
    certifier = IntervalBounds(model)
    x = _images(1, seed=4)
    ub = float(score_upper_bounds(certifier, x, EPS, [score])[score][0])
    points = _pgd_points(model, x, EPS, score)
    assert float((points - x).abs().max()) <= EPS + 1e-6
    with torch.no_grad():
        attacked = SCORE_FNS[score](model(points))
        clean = float(SCORE_FNS[score](model(x))[0])
    assert float(attacked.max()) > clean  # the attack did push the score up ...
    assert float(attacked.max()) <= ub  # ... and stayed under the certified bound
    _assert_nodes_contain(certifier, model, x, points, EPS)


@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_bound_equals_the_score_at_zero_eps(kind):
    model = _small(kind, seed=5)
    x = _images(8, seed=6)
    ub = score_upper_bounds(IntervalBounds(model), x, 0.0, list(CLASSIFIER_CERTIFIABLE))
    with torch.no_grad():
        logits = model(x)
    for score, fn in SCORE_FNS.items():
        s = fn(logits).double()
        assert bool((ub[score] >= s).all()), score
        torch.testing.assert_close(ub[score], s, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["small_cnn", "fast_cnn"])
def test_bound_grows_with_eps(kind):
    model = _small(kind, seed=7)
    certifier = IntervalBounds(model)
    x = _images(4, seed=8)
    radii = [0.0, 0.25 / 255, 1 / 255, 2 / 255, 8 / 255]
    bounds = [score_upper_bounds(certifier, x, e, list(CLASSIFIER_CERTIFIABLE)) for e in radii]
    for score in CLASSIFIER_CERTIFIABLE:
        for smaller, larger in zip(bounds, bounds[1:]):
            assert bool((larger[score] >= smaller[score]).all()), score
        assert bool((bounds[-1][score] > bounds[0][score]).all()), score


def test_input_box_is_the_ball_within_the_pixel_range():
    x = torch.tensor([[0.0, 0.5 / 255, 0.5, 1.0 - 0.5 / 255, 1.0]], dtype=torch.float64)
    box = input_box(x, 1 / 255)
    torch.testing.assert_close(box.lo, torch.tensor([[0.0, 0.0, 0.5 - 1 / 255, 1.0 - 1.5 / 255, 1.0 - 1 / 255]],
                                                    dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(box.hi, torch.tensor([[1 / 255, 1.5 / 255, 0.5 + 1 / 255, 1.0, 1.0]],
                                                    dtype=torch.float64), rtol=0, atol=1e-9)


def test_tightened_logit_differences_beat_plain_ibp():
    """The last layer is bounded per logit difference: never looser than lower(z_j) - upper(z_k)."""
    certifier = IntervalBounds(_small("fast_cnn", seed=9))
    b = certifier.logit_bounds(input_box(_images(4, seed=10), 1 / 255))
    plain = b.lower[:, :, None] - b.upper[:, None, :]
    off = ~torch.eye(b.lower.shape[1], dtype=torch.bool)
    assert bool((b.diff_lower[:, off] >= plain[:, off] - 1e-9).all())
    assert bool((b.diff_lower[:, off] > plain[:, off] + 1e-6).any())


# -- the two rules that are easiest to get wrong, on models where the score bound is tight --------------


class _Pixel(nn.Module):
    """Reads one pixel: (N, 1) inputs in [0, 1]."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _max_over_grid(model: nn.Module, x: float, eps: float, score: str) -> float:
    grid = torch.linspace(x - eps, x + eps, 20001)[:, None]
    with torch.no_grad():
        return float(SCORE_FNS[score](model(grid)).max())


def _linear(w, b) -> nn.Linear:
    layer = nn.Linear(len(w[0]), len(w))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return layer


def test_gelu_minimum_inside_the_box():
    """gelu(4x - 2.75) around x = 0.5 straddles GELU's minimum (-0.170 at -0.752); the logit -10 gelu is
    largest there, not at either end of the box."""
    model = _Pixel(_linear([[4.0]], [-2.75]), nn.GELU(), _linear([[-10.0], [0.0]], [0.0, 0.0])).eval()
    eps = 0.1
    ub = score_upper_bounds(IntervalBounds(model), torch.tensor([[0.5]]), eps, list(CLASSIFIER_CERTIFIABLE))
    for score in CLASSIFIER_CERTIFIABLE:
        true_max = _max_over_grid(model, 0.5, eps, score)
        assert true_max <= float(ub[score][0]) <= true_max + 1e-3, score  # sound and (here) tight
    box = _gelu(Box(torch.tensor([-1.15], dtype=torch.float64), torch.tensor([-0.35], dtype=torch.float64)))
    assert float(box.lo) <= -0.16997 and float(box.hi) >= float(torch.nn.functional.gelu(torch.tensor(-0.35)))


def test_batchnorm_with_negative_scale():
    """BN in eval mode with a negative γ maps the box's upper end to the lower one."""
    bn = nn.BatchNorm1d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-2.0, 1.5]))
        bn.bias.copy_(torch.tensor([0.3, -0.2]))
        bn.running_mean.copy_(torch.tensor([0.4, 0.6]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
    model = _Pixel(_linear([[3.0], [-2.0]], [0.1, 0.2]), bn, _linear([[2.0, 0.0], [0.0, 0.0]], [0.0, 0.0])).eval()
    eps = 0.2
    ub = score_upper_bounds(IntervalBounds(model), torch.tensor([[0.5]]), eps, list(CLASSIFIER_CERTIFIABLE))
    for score in CLASSIFIER_CERTIFIABLE:
        true_max = _max_over_grid(model, 0.5, eps, score)
        assert true_max <= float(ub[score][0]) <= true_max + 1e-3, score


# -- refusals ----------------------------------------------------------------------------------------------


class _SigmoidInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.sigmoid(x.flatten(1)))


@pytest.mark.parametrize("model, names", [
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 3)), ["'2'", "Sigmoid"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)), ["'2'", "LayerNorm"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 3)), ["'2'", "Softplus"]),
    (_SigmoidInForward(), ["sigmoid"]),
])
def test_unsupported_layers_are_refused_by_name(model, names):
    with pytest.raises(UnsupportedLayerError) as err:
        IntervalBounds(model.eval())
    for name in names:
        assert name in str(err.value)


def test_batchnorm_in_training_mode_is_refused():
    model = _small("small_cnn")
    certifier = IntervalBounds(model)
    model.trunk[1].train()
    with pytest.raises(UnsupportedLayerError, match=r"'trunk\.1' \(BatchNorm2d\).*model\.eval"):
        score_upper_bounds(certifier, _images(1, seed=0), 1 / 255, ["energy"])


@pytest.mark.parametrize("score", ["mahalanobis", "odin"])
def test_uncertifiable_scores_are_refused(score):
    with pytest.raises(ValueError, match=score):
        score_upper_bounds(IntervalBounds(_small("small_cnn")), _images(1, seed=0), 1 / 255, [score])


# -- through `oodguard evaluate` ---------------------------------------------------------------------------


def test_evaluate_reports_guaranteed_auroc(tmp_path, tiny_data_dir):
    from oodguard.training.evaluate import EvalConfig, evaluate_run

    from ._eval_helpers import make_run

    run = make_run(tmp_path / "run", tiny_data_dir)
    cfg = EvalConfig(ood=["tinyimagenet", "gaussian"], attacks=["none"], scores=["msp", "energy", "mahalanobis"],
                     max_samples=40, batch_size=16, maha_fit_samples=100, certify=[1 / 255, 2 / 255], plots=False)
    report = evaluate_run(run, cfg, tmp_path / "eval")
    rows = [certify_key(1 / 255), certify_key(2 / 255)]
    assert rows == ["certified_1_255", "certified_2_255"]
    assert report["certified"]["rows"] == {"certified_1_255": 1 / 255, "certified_2_255": 2 / 255}
    assert report["certified"]["scores"] == ["msp", "energy"]
    assert "mahalanobis" in report["certified"]["not_certified"]
    for score in ("msp", "energy"):
        for set_name in ("tinyimagenet", "gaussian"):
            per = report["results"][score][set_name]
            clean, r1, r2 = per["none"], per[rows[0]], per[rows[1]]
            assert r1["n_in"] == r1["n_out"] == 40
            # the worst case over the ball is never better for the detector than the clean image
            assert r2["auroc"] <= r1["auroc"] <= clean["auroc"]
    assert rows[0] not in report["results"]["mahalanobis"]["gaussian"]
    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert on_disk["results"]["energy"]["gaussian"][rows[0]] == report["results"]["energy"]["gaussian"][rows[0]]
    with np.load(tmp_path / "eval" / "scores.npz") as raw:
        bound, clean = raw["energy__gaussian__certified_1_255"], raw["energy__gaussian__none"]
        assert bound.shape == (40,) and bool((bound >= clean).all())
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| gaussian | certified (IBP), ε = 1/255 (n = 40 + 40) |" in md
    # the docs table (scripts/render_results.py --certified): real sets first, noise marked
    from ..ops._scripts import load_script

    render = load_script("render_results")
    table = render.render_certified(on_disk)
    g = report["results"]["energy"]["gaussian"][rows[1]]
    assert table.index("| tinyimagenet | 1/255 | 40 + 40 |") < table.index("| gaussian (synthetic) | 1/255 |")
    assert f"| gaussian (synthetic) | 2/255 | 40 + 40 | {100 * g['auroc']:.1f} | {100 * g['fpr_at_95_tpr']:.1f} |" in table


def test_cli_parses_fractions(tmp_path, tiny_data_dir):
    from typer.testing import CliRunner

    from oodguard.cli import app

    from ._eval_helpers import make_run

    run = make_run(tmp_path / "run", tiny_data_dir)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--ood", "gaussian", "--attack", "none", "--scores",
                                      "energy", "--max-samples", "16", "--certify", "1/255,0.5/255", "--no-plots",
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["config"]["certify"] == [1 / 255, 0.5 / 255]
    assert "certified_0.5_255" in report["results"]["energy"]["gaussian"]
    assert "certified_1_255" in result.output
    bad = CliRunner().invoke(app, ["evaluate", str(run), "--certify", "one"])
    assert bad.exit_code == 2 and "--certify" in bad.output
