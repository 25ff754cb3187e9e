"""Drift alarm: an online conformal test martingale over the stream of the active model's p-values.

Under in-distribution traffic the bundle's conformal p-values are (super-)uniform, so any
non-negative martingale built by betting against uniformity stays small: by Ville's inequality it
ever reaches 1/alpha with probability at most alpha. When the traffic shifts, p-values pile up
near 0 and the bet pays off; the alarm fires when the capital crosses 1/alpha and stays on (it is a
test, not a meter) until the next model swap or restart resets it.

The martingale is Vovk's *simple jumper* (Vovk, Nouretdinov & Gammerman, "Conformal test
martingales for change-point detection", 2021) over power betting functions
`f_e(p) = e * p**(e - 1)` (each integrates to 1 on [0, 1], so each is a fair bet against
uniform p-values; e = 1 is "do not bet"). Before each p-value a fraction `jump` of the capital is
spread evenly over all e: a long in-distribution prefix therefore cannot drive the useful bets to
zero, and detection after a change takes a bounded number of steps, while the mixture stays a
test martingale (Ville still holds). Everything is in log space; `update` is pure.

Caveat (stated in the README too): the p-values share one finite calibration set, so given that
set they are uniform only up to its sampling error (~1/sqrt(n)); the guarantee is exact over the
draw of the calibration set, approximate for one fixed bundle.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

# Power betting exponents: small e bets hard on tiny p-values, e = 1 holds cash.
EPSILONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0)
DEFAULT_JUMP = 1e-4  # fraction of capital redistributed over the bets before every p-value (see `update`)
_P_FLOOR = 1e-12  # a p-value of exactly 0 cannot come from a conformal p-value; guard the log anyway


@dataclass(frozen=True)
class DriftState:
    """Log capital of each bet (same order as `epsilons`), p-values seen, and whether the alarm fired."""

    log_capital: tuple[float, ...]
    n: int = 0
    alarm: bool = False

    @property
    def log_martingale(self) -> float:
        return _logsumexp(np.asarray(self.log_capital))


def initial_state(epsilons: tuple[float, ...] = EPSILONS) -> DriftState:
    """Capital 1, split evenly over the bets."""
    return DriftState(log_capital=(-math.log(len(epsilons)),) * len(epsilons))


def update(
    state: DriftState,
    p_values,
    alpha: float,
    jump: float = DEFAULT_JUMP,
    epsilons: tuple[float, ...] = EPSILONS,
) -> DriftState:
    """The state after observing `p_values` in order. Pure: returns a new state.

    The alarm latches once log M >= log(1/alpha) at any step. `jump` trades responsiveness after a
    short in-distribution stream against one after a long one: after the shift the best bet needs
    about log(K / jump) + log(1/alpha) nats, plus about 0.9 * jump nats per in-distribution p-value
    seen since the reset (measured on uniform p-values), because the share re-spread to the bets
    each step mostly loses while traffic is in-distribution.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 <= jump <= 1.0:
        raise ValueError(f"jump must be in [0, 1], got {jump}")
    eps = np.asarray(epsilons, dtype=np.float64)
    ps = np.clip(np.asarray(p_values, dtype=np.float64).ravel(), _P_FLOOR, 1.0)
    if ps.size == 0:
        return state
    # Linear space, renormalised every step: c (sums to 1) times exp(log_scale) is the capital.
    log_c = np.asarray(state.log_capital, dtype=np.float64)
    log_scale = _logsumexp(log_c)
    c = np.exp(log_c - log_scale)
    bets = eps * np.power(ps[:, None], eps - 1.0)  # f_e(p) for every p-value and bet at once
    bound = math.log(1.0 / alpha)
    alarm = state.alarm
    keep, share = 1.0 - jump, jump / eps.size
    for f in bets:
        c = (c * keep + share) * f  # jump ((1-J) C_e + J C / K, with C = 1 here), then bet
        total = float(c.sum())
        log_scale += math.log(total)
        c /= total
        if log_scale >= bound:
            alarm = True
    with np.errstate(divide="ignore"):  # a bet at exactly 0 capital (jump = 0 only) is -inf
        log_c = np.log(c) + log_scale
    return DriftState(log_capital=tuple(log_c.tolist()), n=state.n + ps.size, alarm=alarm)


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    if m == -math.inf:
        return m
    return m + math.log(float(np.sum(np.exp(x - m))))


class DriftMonitor:
    """The running test for the active model: `reset` on every model change, `observe` per request.

    `observe` ignores p-values from a model other than the one last `reset` to (a request that
    finished on the old model after a swap). Thread-safe; the critical section is one `update`.
    `on_change(state)` (the metrics' gauges) is called after every change.
    """

    def __init__(self, alpha: float, jump: float = DEFAULT_JUMP, on_change=None):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self.jump = jump
        self._on_change = on_change
        self._lock = threading.Lock()
        self._model: str | None = None
        self._state = initial_state()

    @property
    def state(self) -> DriftState:
        return self._state

    @property
    def model(self) -> str | None:
        return self._model

    def reset(self, model: str) -> None:
        with self._lock:
            self._model = model
            self._state = initial_state()
            state = self._state
        if self._on_change is not None:
            self._on_change(state)

    def observe(self, model: str, p_values) -> None:
        with self._lock:
            if model != self._model:
                return
            self._state = state = update(self._state, p_values, self.alpha, self.jump)
        if self._on_change is not None:
            self._on_change(state)
