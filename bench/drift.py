"""Drift alarm on a real bundle (not part of the test suite): false alarms in-distribution, requests until alarm after a shift.

Two measurements, both with the bundle's own calibration and the service's own code:

1. **Live, through the service path.** For each OOD set, a fresh `oodguard serve --bundle B` (one
   onnxruntime thread) gets `--in-dist` CIFAR-10 test images (one per POST /v1/predict, in a seeded
   random order), then OOD images one request at a time; after each OOD request `/metrics` is read
   until `oodguard_drift_alarm` is 1. Reported: whether the alarm fired during the in-distribution
   part (a false alarm), and how many OOD requests it took.
2. **Offline, many orders.** The same images' p-values (onnxruntime on the bundle's graph,
   `conformal_p_values` against its calibration scores: what the service computes) are fed to
   `service.drift.update` in `--shuffles` random orders: false alarms among those in-distribution
   streams and the distribution of OOD requests until alarm. Only the order differs from (1).

In-distribution: CIFAR-10 test (`../shared/datasets/cifar10_test.npz`, JPEG as stored). OOD:
Tiny-ImageNet test (`tinyimagenet_test.npz`) and Gaussian noise N(0.5, 0.25) clipped to [0, 1],
32x32 PNG (as `training/ood_sets.py` makes it).

    python bench/drift.py                                   # ~2 min on 2 cores; JSON under runs/drift/
    python bench/drift.py --bundle runs/mine/bundle --shuffles 500 --out /tmp/drift.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/drift.py` puts bench/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.serve_process import clean_env, start_oodguard, stop as stop_server  # noqa: E402
from oodguard.service import drift  # noqa: E402
from oodguard.service.bundle import conformal_p_values, verify_bundle  # noqa: E402
from oodguard.service.preprocess import decode_images  # noqa: E402

DATA = REPO.parent / "shared" / "datasets"


def npz_images(path: Path) -> list[bytes]:
    """The stored JPEG files of an oodguard .npz dataset (`jpeg` bytes + `offsets`)."""
    d = np.load(path)
    blob, offsets = d["jpeg"], d["offsets"]
    return [blob[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def gaussian_pngs(n: int, seed: int, size: int = 32) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = np.clip(rng.normal(0.5, 0.25, size=(size, size, 3)), 0.0, 1.0)
        buf = io.BytesIO()
        Image.fromarray((arr * 255).round().astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _gauge(base: str, client: httpx.Client, name: str) -> float:
    for line in client.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def live(bundle: Path, in_dist: list[bytes], ood: list[bytes], alpha: float, log_path: Path) -> dict:
    """One fresh server: the in-distribution stream, then OOD requests until the alarm."""
    args = ["--bundle", str(bundle), "--threads", "1", "--decode-threads", "1", "--drift-alpha", str(alpha)]
    proc, base = start_oodguard(args, in_dist[0], log_path, env=clean_env())
    try:
        with httpx.Client(timeout=30) as client:
            # The readiness probe's own request was observed; start from a known count.
            start_n = _gauge(base, client, "oodguard_drift_observations")
            t0 = time.perf_counter()
            peak = -np.inf
            for i, img in enumerate(in_dist):
                r = client.post(f"{base}/v1/predict", content=img, headers={"content-type": "application/octet-stream"})
                r.raise_for_status()
                if i % 500 == 499:
                    peak = max(peak, _gauge(base, client, "oodguard_drift_log_martingale"))
            false_alarm = _gauge(base, client, "oodguard_drift_alarm") == 1  # latched: any crossing shows
            end_log_m = _gauge(base, client, "oodguard_drift_log_martingale")
            in_dist_s = time.perf_counter() - t0
            until = None
            for k, img in enumerate(ood, start=1):
                client.post(f"{base}/v1/predict", content=img, headers={"content-type": "application/octet-stream"}).raise_for_status()
                if _gauge(base, client, "oodguard_drift_alarm") == 1:
                    until = k
                    break
            observed = _gauge(base, client, "oodguard_drift_observations") - start_n
    finally:
        code = stop_server(proc)
    return {
        "in_dist_requests": len(in_dist),
        "false_alarm": false_alarm,
        "log_martingale_peak_sampled": peak,
        "log_martingale_after_in_dist": end_log_m,
        "ood_requests_until_alarm": until,
        "observations": observed,
        "in_dist_seconds": round(in_dist_s, 1),
        "server_exit": code,
    }


def p_values(bundle: Path, blobs: list[bytes], batch: int = 256) -> np.ndarray:
    report = verify_bundle(bundle, intra_op_threads=1)
    m = report.manifest
    cal = np.asarray(report.calibration, dtype=np.float64)
    names = [o.name for o in report.session.get_outputs()]
    scores = []
    for i in range(0, len(blobs), batch):
        x = decode_images(blobs[i : i + batch], m.input)
        out = dict(zip(names, report.session.run(None, {m.input.name: x})))
        scores.append(np.asarray(out[m.score.output]).reshape(-1))
    return conformal_p_values(cal, np.concatenate(scores))


def offline(p_in: np.ndarray, p_ood: np.ndarray, alpha: float, jump: float, shuffles: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    false_alarms, until = 0, []
    for _ in range(shuffles):
        state = drift.update(drift.initial_state(), rng.permutation(p_in), alpha, jump)
        ood = rng.permutation(p_ood)
        if state.alarm:  # a false alarm: nothing left to detect in this order
            false_alarms += 1
            continue
        for k, p in enumerate(ood, start=1):
            state = drift.update(state, [p], alpha, jump)
            if state.alarm:
                until.append(k)
                break
        else:
            until.append(None)
    found = np.array([u for u in until if u is not None])
    return {
        "shuffles": shuffles,
        "false_alarms": int(false_alarms),
        "never_alarmed": sum(u is None for u in until),  # among the orders without a false alarm
        "until_alarm": {
            "median": float(np.median(found)) if found.size else None,
            "p90": float(np.percentile(found, 90)) if found.size else None,
            "min": int(found.min()) if found.size else None,
            "max": int(found.max()) if found.size else None,
        },
        "ood_p_value_median": float(np.median(p_ood)),
        "in_dist_p_value_mean": float(np.mean(p_in)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--in-dist", type=int, default=10_000, help="in-distribution requests before the shift")
    ap.add_argument("--max-ood", type=int, default=2_000, help="OOD requests at most")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--shuffles", type=int, default=200, help="random orders for the offline measurement")
    ap.add_argument("--no-live", action="store_true", help="offline measurement only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "drift" / "drift.json")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    cifar = npz_images(DATA / "cifar10_test.npz")
    in_dist = [cifar[i] for i in rng.permutation(len(cifar))[: args.in_dist]]
    tiny = npz_images(DATA / "tinyimagenet_test.npz")
    ood_sets = {
        "tinyimagenet": [tiny[i] for i in rng.permutation(len(tiny))[: args.max_ood]],
        "gaussian": gaussian_pngs(args.max_ood, args.seed + 1),
    }
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    setup = {
        "bundle": str(args.bundle), "name": manifest["name"], "version": manifest["version"],
        "score": manifest["score"]["name"], "calibration_size": manifest["calibration"]["size"],
        "alpha": args.alpha, "jump": drift.DEFAULT_JUMP, "epsilons": list(drift.EPSILONS),
        "in_dist": f"CIFAR-10 test, {len(in_dist)} images, seed {args.seed}", "max_ood": args.max_ood,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "onnxruntime_threads": 1, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results: dict = {"setup": setup, "live": {}, "offline": {}}
    p_in = p_values(args.bundle, in_dist)
    for name, ood in ood_sets.items():
        results["offline"][name] = offline(p_in, p_values(args.bundle, ood), args.alpha, drift.DEFAULT_JUMP, args.shuffles, args.seed)
        print(f"offline {name}: {results['offline'][name]}", flush=True)
    if not args.no_live:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for name, ood in ood_sets.items():
            results["live"][name] = live(args.bundle, in_dist, ood, args.alpha, args.out.parent / f"serve-{name}.log")
            print(f"live {name}: {results['live'][name]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
