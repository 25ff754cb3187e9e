"""OOD scores: one pure function per score, higher = more in-distribution.

These functions are the only copy of each formula. Evaluation calls them, the evaluation attacks
differentiate through them (objective = -score for inliers, +score for outliers), and the ONNX export
wrapper (`export.ScoringModule`) calls them inside the traced graph.

- `msp(logits, T)`         max softmax probability of z/T (Hendrycks & Gimpel).
- `energy(logits, T)`      T * logsumexp(z/T) (the negative free energy; Liu et al.).
- `odin(model, x, T, eps)` MSP at temperature T after input pre-processing: one signed-gradient step of
                           size eps (pixel units, [0,1] space) that *raises* the tempered MSP (Liang et al.).
                           The pre-processing needs an input gradient, so ODIN is NOT exportable to ONNX.
                           Attacks go through it with BPDA (the pre-processing step held constant in the
                           backward pass), see `attack_objective`.
- `mahalanobis(f, p)`      -log(1 + min_c (f - mu_c)^T Sigma^-1 (f - mu_c) / D) on penultimate features (D wide),
                           class means and one tied covariance (slightly shrunk) fitted on the training
                           split (Lee et al., single layer, no input pre-processing, no logistic-regression
                           ensemble). A monotone transform of -min_c d^2 (same rankings and metrics) that
                           keeps float32 torch and onnxruntime within 1e-4 even far from the data.
- `detector`               logit(in) - logit(out) of a separate in-vs-out detector (`architectures.GuardedNet`,
                           trained by `oodguard train --method disc`): the robust score of issue 14. It does not
                           look at the classifier at all, so attacking the classifier cannot move it.

`SCORES` maps a name to a `ScoreDef` saying how to compute it from one forward pass (`ModelOutputs`: logits,
features, the detector's margin) and what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

DEFAULT_ODIN_TEMPERATURE = 1000.0
DEFAULT_ODIN_EPS = 0.0014  # pixel units in [0, 1]
DEFAULT_MAHALANOBIS_SHRINKAGE = 0.01  # weight of the scaled identity in the tied covariance


def msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Maximum softmax probability of logits / T, shape (N,)."""
    return torch.softmax(logits / temperature, dim=1).amax(dim=1)


def log_msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log of `msp`, computed stably (ODIN's pre-processing ascends its gradient)."""
    return torch.log_softmax(logits / temperature, dim=1).amax(dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T * logsumexp(logits / T), shape (N,). Higher = lower free energy = more in-distribution."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


@dataclass
class MahalanobisParams:
    """Class means (C, D) and the precision (D, D) of the tied (shared) class-conditional covariance."""

    means: torch.Tensor
    precision: torch.Tensor
    num_fit_samples: int = 0
    shrinkage: float = 0.0

    def to(self, device: torch.device | str) -> MahalanobisParams:
        return MahalanobisParams(self.means.to(device), self.precision.to(device), self.num_fit_samples, self.shrinkage)

    def save_npz(self, path) -> None:
        np.savez(
            path,
            means=self.means.detach().cpu().numpy().astype(np.float32),
            precision=self.precision.detach().cpu().numpy().astype(np.float32),
            num_fit_samples=np.array(self.num_fit_samples, dtype=np.int64),
            shrinkage=np.array(self.shrinkage, dtype=np.float64),
        )

    @classmethod
    def load_npz(cls, path) -> MahalanobisParams:
        with np.load(path, allow_pickle=False) as d:
            return cls(
                means=torch.from_numpy(d["means"].astype(np.float32)),
                precision=torch.from_numpy(d["precision"].astype(np.float32)),
                num_fit_samples=int(d["num_fit_samples"]),
                shrinkage=float(d["shrinkage"]) if "shrinkage" in d.files else 0.0,
            )


def fit_mahalanobis(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float = DEFAULT_MAHALANOBIS_SHRINKAGE
) -> MahalanobisParams:
    """Class means and the precision of the tied covariance (pooled over classes), shrunk toward a multiple
    of the identity: Sigma = (1 - a) S + a (tr S / D) I.

    Penultimate ReLU features are often rank-deficient; without shrinkage the precision has huge
    eigenvalues along directions of ~zero variance, which magnify float32 noise (and make torch and
    onnxruntime disagree far beyond 1e-4). Fitted in float64. Fit on the training split only, never on
    calibration or test images.
    """
    f = features.detach().to(torch.float64)
    y = labels.detach().to(torch.long)
    if f.ndim != 2 or y.shape != (f.shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(f.shape)} and {tuple(y.shape)}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    counts = torch.bincount(y, minlength=num_classes)
    if counts.numel() > num_classes or bool((counts[:num_classes] == 0).any()):
        missing = [c for c in range(num_classes) if c >= counts.numel() or counts[c] == 0]
        raise ValueError(f"cannot fit Mahalanobis: no training features for class(es) {missing}")
    means = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f) / counts[:, None]
    centred = f - means[y]
    cov = centred.T @ centred / f.shape[0]
    scale = torch.trace(cov) / cov.shape[0]
    if not scale > 0:
        raise ValueError("cannot fit Mahalanobis: the features have zero variance")
    cov = (1.0 - shrinkage) * cov + shrinkage * scale * torch.eye(cov.shape[0], dtype=torch.float64)
    precision = torch.linalg.pinv(cov, hermitian=True)
    return MahalanobisParams(means.float(), precision.float(), num_fit_samples=int(f.shape[0]), shrinkage=shrinkage)


def mahalanobis(features: torch.Tensor, params: MahalanobisParams) -> torch.Tensor:
    """-log(1 + min_c (f - mu_c)^T P (f - mu_c) / D), shape (N,): a decreasing function of the squared
    Mahalanobis distance to the closest class mean (per feature dimension, D = feature width).

    Why not the bare -min_c d^2: OOD inputs sit at d^2 / D in the hundreds, where float32 alone
    (torch vs onnxruntime summation order) differs by more than 1e-4 and the served graph could not
    be held to the export parity gate. log1p turns relative error into absolute error (d log(1+x) =
    dx / (1+x)), so any input stays within ~1e-5; being strictly monotone it changes no ranking, no
    metric and no attack direction. Written as an explicit difference (N, C, D) rather than the expanded
    f'Pf - 2f'Pmu + mu'Pmu, which cancels catastrophically in float32.
    """
    diff = features[:, None, :] - params.means[None, :, :]  # (N, C, D)
    dist2 = ((diff @ params.precision) * diff).sum(dim=2)  # (N, C)
    return -torch.log1p(dist2.amin(dim=1) / features.shape[1])


def odin_preprocess(
    model: nn.Module, x: torch.Tensor, temperature: float = DEFAULT_ODIN_TEMPERATURE, eps: float = DEFAULT_ODIN_EPS
) -> torch.Tensor:
    """ODIN's input pre-processing: x + eps * sign(d log MSP_T / dx), clamped to [0, 1].

    Returns a detached tensor. eps is in pixel units (our models normalise internally), unlike the
    original code which stepped in normalised space.
    """
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_msp(model(xg), temperature).sum(), xg)
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


def odin(
    model: nn.Module, x: torch.Tensor, temperature: float = DEFAULT_ODIN_TEMPERATURE, eps: float = DEFAULT_ODIN_EPS
) -> torch.Tensor:
    """ODIN score: MSP at temperature T of the pre-processed input, shape (N,)."""
    with torch.no_grad():
        return msp(model(odin_preprocess(model, x, temperature, eps)), temperature)


def detector_margin(detector_logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) in-vs-out detector logits (column 0 "in-distribution", 1 "outlier") -> (N,) logit(in) - logit(out):
    the log-odds the detector gives "in-distribution"."""
    return detector_logits[:, 0] - detector_logits[:, 1]


# -- registry ---------------------------------------------------------------------------------------


@dataclass
class ScoreContext:
    """Parameters a score may need beyond (logits, features)."""

    temperature: float = 1.0  # msp / energy
    odin_temperature: float = DEFAULT_ODIN_TEMPERATURE
    odin_eps: float = DEFAULT_ODIN_EPS
    mahalanobis: MahalanobisParams | None = None


@dataclass
class ModelOutputs:
    """One forward pass, as the scores see it: the classifier's logits (N, K), its penultimate features (N, D),
    and the detector's margin (N,) when the model has a detector (`GuardedNet`), else None."""

    logits: torch.Tensor | None
    features: torch.Tensor | None
    detector: torch.Tensor | None = None


OutputsFn = Callable[[ModelOutputs, ScoreContext], torch.Tensor]


@dataclass(frozen=True)
class ScoreDef:
    """How to compute a score from one forward pass (`ModelOutputs`) and what it needs.

    `needs_input_preprocessing` (ODIN): the outputs must come from the model on the *pre-processed*
    input (`odin_preprocess`), which needs gradients and so is not exportable. `needs_detector`: the model
    must have an in-vs-out detector (`GuardedNet`).
    """

    name: str
    from_outputs: OutputsFn
    needs_features: bool = False
    needs_detector: bool = False
    needs_input_preprocessing: bool = False
    exportable: bool = True
    params: Callable[[ScoreContext], dict[str, float]] = field(default=lambda ctx: {})


def _maha_from_outputs(out: ModelOutputs, ctx: ScoreContext) -> torch.Tensor:
    if ctx.mahalanobis is None:
        raise ValueError("the mahalanobis score needs fitted MahalanobisParams (fit_mahalanobis on the train split)")
    return mahalanobis(out.features, ctx.mahalanobis)


def _detector_from_outputs(out: ModelOutputs, ctx: ScoreContext) -> torch.Tensor:
    if out.detector is None:
        raise ValueError("the detector score needs a model with an in-vs-out detector (`oodguard guard`)")
    return out.detector


SCORES: dict[str, ScoreDef] = {
    "msp": ScoreDef(
        "msp",
        lambda out, ctx: msp(out.logits, ctx.temperature),
        params=lambda ctx: {"temperature": ctx.temperature},
    ),
    "energy": ScoreDef(
        "energy",
        lambda out, ctx: energy(out.logits, ctx.temperature),
        params=lambda ctx: {"temperature": ctx.temperature},
    ),
    "odin": ScoreDef(
        "odin",
        lambda out, ctx: msp(out.logits, ctx.odin_temperature),
        needs_input_preprocessing=True,
        exportable=False,
        params=lambda ctx: {"temperature": ctx.odin_temperature, "eps": ctx.odin_eps},
    ),
    "mahalanobis": ScoreDef("mahalanobis", _maha_from_outputs, needs_features=True),
    "detector": ScoreDef("detector", _detector_from_outputs, needs_detector=True),
}


def check_score_names(names: list[str], *, exportable_only: bool = False) -> list[str]:
    """Validate score names against the registry (deduplicated, order kept); ValueError names the bad one."""
    out = []
    for name in names:
        if name not in SCORES:
            raise ValueError(f"unknown score {name!r}; valid scores: {', '.join(SCORES)}")
        if exportable_only and not SCORES[name].exportable:
            raise ValueError(f"score {name!r} is not exportable to ONNX (its input pre-processing needs gradients)")
        if name not in out:
            out.append(name)
    return out


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) from one pass: the models promise forward(x) == head(features(x))."""
    features = model.features(x)
    return model.head(features), features


def has_detector(model: nn.Module) -> bool:
    return callable(getattr(model, "detector_logits", None))


def check_model_scores(model: nn.Module, names: list[str]) -> None:
    """ValueError naming the first score this model cannot compute (a detector score without a detector)."""
    for name in names:
        if SCORES[name].needs_detector and not has_detector(model):
            raise ValueError(f"score {name!r} needs a model with an in-vs-out detector: compose one with "
                             "`oodguard guard --classifier RUN --detector RUN` (the detector from --method disc)")


def forward_outputs(model: nn.Module, x: torch.Tensor, names: list[str], classifier: bool = True) -> ModelOutputs:
    """One forward pass with what the scores `names` need: the detector runs only when one of them uses it, the
    classifier unless `classifier=False` and none of them uses it (an attack on the detector score alone)."""
    logits = features = None
    if classifier or any(not SCORES[n].needs_detector for n in names):
        logits, features = forward_with_features(model, x)
    detector = detector_margin(model.detector_logits(x)) if any(SCORES[n].needs_detector for n in names) else None
    return ModelOutputs(logits, features, detector)


def worst_case_plan(name: str, objectives: tuple[str, ...], restarts: int) -> tuple[tuple[str, ...], int]:
    """(objectives, restarts) of the worst-case attack on score `name`. The surrogates act on the classifier's
    logits; a detector score does not depend on them, so its attack spends the same gradient budget on the
    score itself from more starts (restart 0 from the image, the others from random points of the ball)."""
    if SCORES[name].needs_detector and objectives:
        return ("score",), restarts * len(objectives)
    return objectives, restarts


def attack_objective(model: nn.Module, x: torch.Tensor, name: str, ctx: ScoreContext) -> torch.Tensor:
    """Score `name` of x, differentiable in x: what the evaluation attacks push down (inliers) or up (outliers).

    ODIN is differentiated through its BPDA form (pre-processing perturbation held constant); its value
    is exactly the ODIN score.
    """
    sdef = SCORES[name]
    if sdef.needs_input_preprocessing:
        x = x + (odin_preprocess(model, x, ctx.odin_temperature, ctx.odin_eps) - x).detach()
    return sdef.from_outputs(forward_outputs(model, x, [name], classifier=False), ctx)


# Surrogate objectives of the worst-case attack, besides the score itself: each a function of the logits,
# higher = more confident = more in-distribution-looking, whatever the served score is.
ATTACK_SURROGATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "log_msp": lambda z: log_msp(z),
    "margin": lambda z: (lambda top: top[:, 0] - top[:, 1])(torch.topk(z, 2, dim=1).values),  # top-1 minus top-2 logit
    "ce_uniform": lambda z: torch.logsumexp(z, dim=1) - z.mean(dim=1),  # cross-entropy to uniform (the OE loss)
}
WORST_CASE_OBJECTIVES = ("score", *ATTACK_SURROGATES)


def scored_forward(model: nn.Module, name: str, ctx: ScoreContext):
    """x -> (score `name`, {"score": it, **surrogates}) from one forward pass: `attacks.pgd_worst_case`'s input."""
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sdef = SCORES[name]
        if sdef.needs_input_preprocessing:  # ODIN: its BPDA value; the surrogates from the plain logits
            score, logits = attack_objective(model, x, name, ctx), model(x)
        elif sdef.needs_detector:  # the classifier's surrogates cannot move it: the score alone (worst_case_plan)
            score = sdef.from_outputs(forward_outputs(model, x, [name], classifier=False), ctx)
            return score, {"score": score}
        else:
            out = forward_outputs(model, x, [name])
            score, logits = sdef.from_outputs(out, ctx), out.logits
        return score, {"score": score, **{k: f(logits.float()) for k, f in ATTACK_SURROGATES.items()}}

    return forward


def compute_scores(
    model: nn.Module, x: torch.Tensor, names: list[str], ctx: ScoreContext
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every requested score for a batch, with one shared forward pass (plus ODIN's own)."""
    with torch.no_grad():
        outputs = forward_outputs(model, x, names)
        out: dict[str, torch.Tensor] = {}
        for name in names:
            sdef = SCORES[name]
            if sdef.needs_input_preprocessing:
                out[name] = odin(model, x, ctx.odin_temperature, ctx.odin_eps)
            else:
                out[name] = sdef.from_outputs(outputs, ctx)
    return outputs.logits, out
