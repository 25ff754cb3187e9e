"""Numbers -> verdicts for the serving benchmark: the limit, the ratio table, markdown and the plot.

Pure functions of the result dictionary bench/serve.py writes (`--out`), so a saved JSON can be
re-rendered (`python bench/serve.py --render docs/bench/serve.json --markdown ...`) and the tests can
check the arithmetic without running a server.

Result layout, per bundle::

    {"ceiling_images_per_s": float,                 # onnxruntime in-process, batches of 32, no HTTP
     "systems": {SYSTEM: {"not_run": reason} | {"cells": {"32": CELL, ...}, "settings": {...}}}}

    CELL = {"images_per_s", "p50_ms", "p95_ms", "p99_ms", "requests", "errors", "seconds",
            "server_cpu_us_per_request", "client_cpu_us_per_request", ...} or {"failed": reason}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Every system, in table order. The floor and ceiling bound the service; the rest are peers.
SERVICE = "oodguard"
SYSTEMS = {
    "oodguard": "oodguard serve, dynamic batching on (defaults: max_batch 32, max_wait 5 ms)",
    "oodguard-nobatch": "oodguard serve --no-batching",
    "floor": "HTTP floor: bare ASGI app (multipart + JPEG decode, no model) under uvicorn",
    "fastapi-onnx": "hand-written FastAPI + onnxruntime, one run per request",
    "fastapi-torch": "hand-written FastAPI + PyTorch (eager), one forward per request",
    "torchserve": "TorchServe 0.12, default batching (batch size 1)",
    "torchserve-batch32": "TorchServe 0.12, batch_size 32, max_batch_delay 5 ms",
}
PEERS = ("oodguard-nobatch", "fastapi-onnx", "fastapi-torch", "torchserve", "torchserve-batch32")
TORCHSERVE = ("torchserve", "torchserve-batch32")
HAND_WRITTEN = ("fastapi-onnx", "fastapi-torch")
# Targets of the issue at concurrency 32: service/limit, and service/peer minimum ratios.
TARGET_CONCURRENCY = 32
TARGET_VS_LIMIT = 0.8
TARGET_VS_PEER = {"fastapi-onnx": 1.25, "fastapi-torch": 3.0, "torchserve-best": 1.0}


def serial_limit(floor: float, ceiling: float) -> float:
    """Images/s when HTTP handling (floor rate) and the model (ceiling rate) share the same cores in series.

    Each image costs 1/floor seconds of HTTP work plus 1/ceiling seconds of model work, so a process
    that did nothing else would reach 1 / (1/floor + 1/ceiling).
    """
    if not (floor > 0 and ceiling > 0):  # also catches NaN
        return float("nan")
    return 1.0 / (1.0 / floor + 1.0 / ceiling)


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def cell(bundle: Mapping, system: str, concurrency: int) -> Mapping | None:
    """The measured cell, or None when the system did not run or the cell failed."""
    entry = bundle.get("systems", {}).get(system, {})
    c = entry.get("cells", {}).get(str(concurrency))
    return c if c and "failed" not in c else None


def rate(bundle: Mapping, system: str, concurrency: int) -> float | None:
    c = cell(bundle, system, concurrency)
    return None if c is None else float(c["images_per_s"])


def concurrencies(bundle: Mapping) -> list[int]:
    seen: set[int] = set()
    for entry in bundle.get("systems", {}).values():
        seen.update(int(k) for k in entry.get("cells", {}))
    return sorted(seen)


def ratio_rows(bundle: Mapping) -> list[dict]:
    """One row per concurrency: limit, the service's rate, service/limit and service/each peer."""
    ceiling = bundle.get("ceiling_images_per_s")
    rows = []
    for c in concurrencies(bundle):
        floor = rate(bundle, "floor", c)
        limit = serial_limit(floor, ceiling) if floor and ceiling else float("nan")
        service = rate(bundle, SERVICE, c)
        row = {"concurrency": c, "floor": floor, "ceiling": ceiling, "limit": limit, "service": service,
               "vs_limit": _ratio(service, limit)}
        for peer in PEERS:
            row[f"vs_{peer}"] = _ratio(service, rate(bundle, peer, c))
        ts = [r for r in (rate(bundle, t, c) for t in TORCHSERVE) if r]
        row["vs_torchserve-best"] = _ratio(service, max(ts)) if ts else float("nan")
        rows.append(row)
    return rows


def target_checks(bundle: Mapping, concurrency: int = TARGET_CONCURRENCY) -> list[dict]:
    """The issue's targets at `concurrency`: name, measured value, target, met (None = not measurable)."""
    row = next((r for r in ratio_rows(bundle) if r["concurrency"] == concurrency), None)
    if row is None:
        return []
    checks = [_check("service / limit", row["vs_limit"], TARGET_VS_LIMIT, ">=")]
    for peer, target in TARGET_VS_PEER.items():
        op = ">" if peer == "torchserve-best" else ">="
        checks.append(_check(f"service / {peer}", row[f"vs_{peer}"], target, op))
    service = cell(bundle, SERVICE, concurrency)
    errors = None if service is None else int(service["errors"])
    checks.append({"name": "service errors", "value": errors, "target": "0",
                   "met": None if errors is None else errors == 0})
    p99 = None if service is None else float(service["p99_ms"])
    peers_p99 = [float(c["p99_ms"]) for c in (cell(bundle, p, concurrency) for p in HAND_WRITTEN) if c]
    best = min(peers_p99) if peers_p99 else None
    checks.append({"name": "service p99 <= hand-written p99 (ms)", "value": p99, "target": best,
                   "met": None if p99 is None or best is None else p99 <= best})
    return checks


def _check(name: str, value: float, target: float, op: str) -> dict:
    met = None if math.isnan(value) else (value >= target if op == ">=" else value > target)
    return {"name": name, "value": value, "target": f"{op} {target}", "met": met}


# -- rendering ------------------------------------------------------------------------------------------


def _num(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _cell_text(text: str, limit: int = 200) -> str:
    """Free text inside a markdown table cell: no pipes or newlines, bounded length."""
    text = " ".join(str(text).replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _x(v) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2f}x"


def ratio_table_text(name: str, bundle: Mapping) -> str:
    """The ratio table printed after every run (fixed-width, diff-friendly)."""
    heads = ["conc", "floor", "ceiling", "limit", "oodguard", "/limit", "/nobatch", "/fa-onnx", "/fa-torch", "/ts", "/ts-b32"]
    lines = [f"== {name}: images/s and ratios (oodguard / X) ==", " ".join(f"{h:>9}" for h in heads)]
    for r in ratio_rows(bundle):
        vals = [str(r["concurrency"]), _num(r["floor"]), _num(r["ceiling"]), _num(r["limit"]), _num(r["service"]),
                _x(r["vs_limit"]), _x(r["vs_oodguard-nobatch"]), _x(r["vs_fastapi-onnx"]), _x(r["vs_fastapi-torch"]),
                _x(r["vs_torchserve"]), _x(r["vs_torchserve-batch32"])]
        lines.append(" ".join(f"{v:>9}" for v in vals))
    return "\n".join(lines)


def systems_table_markdown(bundle: Mapping) -> str:
    """Throughput and latency per system and concurrency (markdown)."""
    lines = ["| system | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors / requests | server CPU µs/img | client CPU µs/img |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ceiling = bundle.get("ceiling_images_per_s")
    lines.append(f"| model ceiling (onnxruntime, batch 32, in-process) | - | {_num(ceiling)} | - | - | - | - | - | - |")
    for system in SYSTEMS:
        entry = bundle.get("systems", {}).get(system)
        if entry is None:
            continue
        if "not_run" in entry:
            lines.append(f"| {system} | - | not run: {_cell_text(entry['not_run'])} | | | | | | |")
            continue
        for c, cl in sorted(entry.get("cells", {}).items(), key=lambda kv: int(kv[0])):
            if "failed" in cl:
                lines.append(f"| {system} | {c} | failed: {_cell_text(cl['failed'])} | | | | | | |")
                continue
            lines.append(
                f"| {system} | {c} | {_num(cl['images_per_s'])} | {_num(cl['p50_ms'], 2)} | {_num(cl['p95_ms'], 2)} | "
                f"{_num(cl['p99_ms'], 2)} | {cl['errors']} / {cl['requests']} | {_num(cl.get('server_cpu_us_per_request'), 0)} | "
                f"{_num(cl.get('client_cpu_us_per_request'), 0)} |")
    return "\n".join(lines)


def ratio_table_markdown(bundle: Mapping) -> str:
    lines = ["| concurrency | floor | ceiling | limit | oodguard | / limit | / no batching | / FastAPI+ORT | / FastAPI+torch "
             "| / TorchServe | / TorchServe b32 |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ratio_rows(bundle):
        lines.append(
            f"| {r['concurrency']} | {_num(r['floor'])} | {_num(r['ceiling'])} | {_num(r['limit'])} | {_num(r['service'])} | "
            f"{_x(r['vs_limit'])} | {_x(r['vs_oodguard-nobatch'])} | {_x(r['vs_fastapi-onnx'])} | "
            f"{_x(r['vs_fastapi-torch'])} | {_x(r['vs_torchserve'])} | {_x(r['vs_torchserve-batch32'])} |")
    return "\n".join(lines)


def targets_markdown(bundle: Mapping) -> str:
    if not target_checks(bundle):
        return f"(no measurement at concurrency {TARGET_CONCURRENCY}: targets not checked)"
    lines = [f"| target at concurrency {TARGET_CONCURRENCY} | measured | target | met |", "|---|---:|---:|---|"]
    for chk in target_checks(bundle):
        v = chk["value"]
        shown = _x(v) if isinstance(v, float) and chk["name"].startswith("service /") else _num(v, 2) if isinstance(v, float) else str(v)
        met = "n/a" if chk["met"] is None else ("yes" if chk["met"] else "**no**")
        lines.append(f"| {chk['name']} | {shown} | {chk['target']} | {met} |")
    return "\n".join(lines)


def batching_headroom(bundle: Mapping) -> str | None:
    """What batching can buy at most: onnxruntime's batch-32 rate over its batch-1 rate, same threads.

    When the model dominates a request's cost, no server on the same runtime and threads can beat a
    per-request endpoint by more than about this ratio (the HTTP work is the rest).
    """
    b32, b1 = bundle.get("ceiling_images_per_s"), (bundle.get("ceiling_batch1") or {}).get("images_per_s")
    if not b32 or not b1:
        return None
    threads = bundle.get("intra_op_threads", (bundle.get("ceiling") or {}).get("intra_op_threads", "?"))
    return (f"Model alone (onnxruntime in-process, {threads} intra-op thread(s)): {b32:,.1f} img/s on batches of 32, "
            f"{b1:,.1f} img/s one image at a time: batching can buy at most **{b32 / b1:.2f}×** on the model's share "
            "of the work.")


def render_markdown(report: Mapping, plot_name: str | None = None) -> str:
    """The docs/benchmarks serving section: setup, per-bundle tables, targets."""
    env = report.get("environment", {})
    out = ["## Serving benchmark", "", f"Command: `{report.get('command', '')}`", "",
           f"Machine: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; load average at start "
           f"{env.get('load_average_start', '?')}. Versions: "
           + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()) + ".", "",
           "Thread settings: " + "; ".join(f"{k}: {v}" for k, v in report.get("threads", {}).items()) + ".", "",
           "Load: " + report.get("load_description", ""), ""]
    if plot_name:
        out += [f"![throughput vs concurrency]({plot_name})", ""]
    for name, bundle in report.get("bundles", {}).items():
        out += [f"### {name}", "", bundle.get("description", ""), ""]
        headroom = batching_headroom(bundle)
        if headroom:
            out += [headroom, ""]
        out += [ratio_table_markdown(bundle), "", targets_markdown(bundle), "", systems_table_markdown(bundle), ""]
    for note in report.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out).rstrip() + "\n"


def plot(report: Mapping, path: str) -> None:
    """Throughput vs concurrency per system (one panel per bundle), ceiling and limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundles = report.get("bundles", {})
    fig, axes = plt.subplots(1, max(1, len(bundles)), figsize=(6.5 * max(1, len(bundles)), 4.5), squeeze=False)
    for ax, (name, bundle) in zip(axes[0], bundles.items()):
        cs = concurrencies(bundle)
        for system in SYSTEMS:
            ys = [rate(bundle, system, c) for c in cs]
            if any(y is not None for y in ys):
                ax.plot(cs, [float("nan") if y is None else y for y in ys], marker="o",
                        linewidth=2.5 if system == SERVICE else 1.2, label=system)
        rows = ratio_rows(bundle)
        ax.plot(cs, [r["limit"] for r in rows], "k--", linewidth=1, label="limit (floor ∘ ceiling)")
        if bundle.get("ceiling_images_per_s"):
            ax.axhline(bundle["ceiling_images_per_s"], color="grey", linestyle=":", linewidth=1, label="model ceiling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
