"""The benchmark scripts' own logic, in-process and fast: no server, no full benchmark run.

- serve_report: the serial-composition limit, the ratio table, the issue's targets, markdown rendering;
- bench/peers/bare_asgi.py: multipart parsing and the ASGI app on the very bytes the load client sends;
- the hand-written FastAPI + onnxruntime peer and the ceiling measurement on a tiny bundle;
- bench/train.py's cost arithmetic.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from bench import load, serve, serve_bundles, serve_process, serve_report, serve_torchserve
from bench.peers import bare_asgi

from ..service.bundle_factory import encode_image, make_tiny_bundle


def _jpeg(size: int = 32, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _split_request(request: bytes) -> tuple[dict[bytes, bytes], bytes]:
    head, body = request.split(b"\r\n\r\n", 1)
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, v = line.split(b":", 1)
        headers[k.strip().lower()] = v.strip()
    return headers, body


# -- the limit and the ratios ---------------------------------------------------------------------------


def test_serial_limit_is_the_harmonic_composition():
    assert serve_report.serial_limit(1000.0, 1000.0) == pytest.approx(500.0)
    # 1 ms of HTTP + 0.25 ms of model per image -> 800 images/s
    assert serve_report.serial_limit(1000.0, 4000.0) == pytest.approx(800.0)
    assert serve_report.serial_limit(1000.0, 4000.0) < min(1000.0, 4000.0)
    assert math.isnan(serve_report.serial_limit(0.0, 1000.0))
    assert math.isnan(serve_report.serial_limit(float("nan"), 1000.0))


def _cell(rate: float, p99: float = 10.0, errors: int = 0) -> dict:
    return {"images_per_s": rate, "p50_ms": p99 / 3, "p95_ms": p99 / 2, "p99_ms": p99, "requests": 1000,
            "errors": errors, "seconds": 3.0, "server_cpu_us_per_request": 900, "client_cpu_us_per_request": 150}


def _bundle(service_at_32: float = 700.0, service_p99: float = 20.0, errors: int = 0) -> dict:
    return {
        "ceiling_images_per_s": 4000.0,
        "systems": {
            "oodguard": {"cells": {"1": _cell(300.0), "32": _cell(service_at_32, service_p99, errors)}},
            "floor": {"cells": {"1": _cell(1000.0), "32": _cell(1000.0)}},
            "fastapi-onnx": {"cells": {"32": _cell(500.0, 40.0)}},
            "fastapi-torch": {"cells": {"32": _cell(200.0, 90.0)}},
            "torchserve": {"cells": {"32": _cell(100.0)}},
            "torchserve-batch32": {"cells": {"32": _cell(350.0)}},
            "oodguard-nobatch": {"not_run": "skipped | with a pipe"},
        },
    }


def test_ratio_rows_use_the_floor_at_each_concurrency():
    rows = {r["concurrency"]: r for r in serve_report.ratio_rows(_bundle())}
    assert sorted(rows) == [1, 32]
    r = rows[32]
    assert r["limit"] == pytest.approx(800.0)
    assert r["vs_limit"] == pytest.approx(700.0 / 800.0)
    assert r["vs_fastapi-onnx"] == pytest.approx(1.4)
    assert r["vs_fastapi-torch"] == pytest.approx(3.5)
    assert r["vs_torchserve-best"] == pytest.approx(2.0)  # the better TorchServe setting (batch 32)
    assert math.isnan(r["vs_oodguard-nobatch"])  # not run -> no ratio, not zero
    assert math.isnan(rows[1]["vs_fastapi-onnx"])  # no cell at c=1


def test_target_checks_pass_and_fail():
    met = {c["name"]: c["met"] for c in serve_report.target_checks(_bundle())}
    assert all(met.values()), met
    slow = {c["name"]: c["met"] for c in serve_report.target_checks(_bundle(service_at_32=550.0, service_p99=95.0, errors=2))}
    assert slow["service / limit"] is False  # 550 / 800 < 0.8
    assert slow["service / fastapi-onnx"] is False  # 1.1 < 1.25
    assert slow["service / fastapi-torch"] is False  # 2.75 < 3
    assert slow["service / torchserve-best"] is True  # 550 > 350
    assert slow["service errors"] is False
    assert slow["service p99 <= hand-written p99 (ms)"] is False  # 95 > 40


def test_markdown_and_text_render(tmp_path):
    report = {"command": "python bench/serve.py", "environment": {"cpu": "test cpu", "cores": 2, "versions": {"x": "1"}},
              "threads": {"oodguard": "1"}, "bundles": {"tiny": _bundle()}, "notes": ["a note"]}
    md = serve_report.render_markdown(report, plot_name="serve.png")
    assert "| 32 | 1,000.0 | 4,000.0 | 800.0 | 700.0 | 0.88x |" in md
    assert "not run: skipped / with a pipe" in md  # a pipe would break the table
    assert "![throughput vs concurrency](serve.png)" in md and "- a note" in md
    text = serve_report.ratio_table_text("tiny", _bundle())
    assert "0.88x" in text and "1.40x" in text
    serve_report.plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


# -- the bare ASGI floor ------------------------------------------------------------------------------------


def test_bare_asgi_parses_the_load_clients_multipart_body():
    image = _jpeg()
    headers, body = _split_request(serve_process.multipart_request("127.0.0.1:1", image, "/v1/predict"))
    assert bare_asgi.parse_multipart_file(body, headers[b"content-type"]) == image


def test_bare_asgi_parser_picks_the_named_field_and_refuses_bad_forms():
    boundary = b"XyZ"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n\x00\x01--XyZ-not-a-boundary\r\n--XyZ--\r\n")
    ctype = b"multipart/form-data; boundary=" + boundary
    assert bare_asgi.parse_multipart_file(body, ctype) == b"\x00\x01--XyZ-not-a-boundary"
    assert bare_asgi.parse_multipart_file(body, ctype, field="note") == b"hello"
    with pytest.raises(bare_asgi.MultipartError, match="no 'files' field"):
        bare_asgi.parse_multipart_file(body, ctype, field="files")
    with pytest.raises(bare_asgi.MultipartError, match="boundary"):
        bare_asgi.parse_multipart_file(body, b"application/json")


def _call_asgi(request: bytes, chunk: int = 100) -> tuple[int, dict]:
    headers, body = _split_request(request)
    messages = [{"type": "http.request", "body": body[i:i + chunk], "more_body": i + chunk < len(body)}
                for i in range(0, len(body), chunk)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": list(headers.items())}
    asyncio.run(bare_asgi.app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_bare_asgi_app_decodes_a_chunked_upload_to_floats():
    image = _jpeg(seed=3)
    status, payload = _call_asgi(serve_process.multipart_request("h:1", image))
    assert status == 200
    assert payload["shape"] == [3, 32, 32]
    expected = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32).mean() / 255.0
    assert payload["mean"] == pytest.approx(float(expected), abs=1e-5)
    status, payload = _call_asgi(serve_process.multipart_request("h:1", b"not an image"))
    assert status == 415 and "cannot decode" in payload["error"]


# -- peers, ceiling, TorchServe config ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bench") / "tiny")


def test_fastapi_onnx_peer_answers_with_the_models_class(tiny_bundle):
    from fastapi.testclient import TestClient

    from bench.peers import fastapi_onnx

    app = fastapi_onnx.create_app(tiny_bundle / "model.onnx", ["red", "green", "blue"], (8, 8), threads=1)
    with TestClient(app) as client:
        r = client.post("/v1/predict", files={"file": ("a.png", encode_image((0, 0, 255)), "image/png")})
    assert r.status_code == 200
    assert r.json()["label"] == "blue" and r.json()["confidence"] > 0.9


def test_ceiling_runs_batches_of_32(tiny_bundle):
    result = serve.measure_ceiling(tiny_bundle, encode_image((255, 0, 0)), threads=1, seconds=0.05)
    assert result["batch"] == 32 and result["batches"] >= 3
    assert result["images_per_s"] == pytest.approx(32 * result["batches"] / result["seconds"], rel=0.01)


def test_process_tree_cpu_counts_this_process():
    before = serve_process.tree_cpu_seconds(os.getpid())
    x = 0
    for i in range(2_000_000):
        x += i
    assert serve_process.tree_cpu_seconds(os.getpid()) > before


def test_torchserve_config_for_each_setting(tmp_path):
    for system, batch in (("torchserve", 1), ("torchserve-batch32", 32)):
        argv, env, settings = serve_torchserve.command(system, tmp_path / "store", tmp_path, (1, 2, 3), workers=2)
        props = dict(line.split("=", 1) for line in (tmp_path / f"{system}.properties").read_text().splitlines())
        model = json.loads(props["models"])[serve_torchserve.MODEL_NAME]["1.0"]
        assert (model["batchSize"], model["minWorkers"], model["maxWorkers"]) == (batch, 2, 2)
        assert props["inference_address"] == "http://127.0.0.1:1" and props["disable_token_authorization"] == "true"
        assert "--foreground" in argv and settings["batch_size"] == batch
        assert env["LOG_LOCATION"].startswith(str(tmp_path))


def test_torch_peers_get_a_short_openmp_spin_unless_configured():
    assert serve_process.torch_env({"PATH": "/bin"})["GOMP_SPINCOUNT"] == "10000"
    assert "GOMP_SPINCOUNT" not in serve_process.torch_env({"OMP_WAIT_POLICY": "PASSIVE"})
    assert serve_process.torch_env({"GOMP_SPINCOUNT": "5"})["GOMP_SPINCOUNT"] == "5"


def test_cli_arguments():
    args = serve.parse_args(["--bundles", "a,b", "--concurrency", "1,32", "--systems", "floor,oodguard"])
    assert args.bundles == ["a", "b"] and args.concurrency == [1, 32]
    assert args.threads == [1, 1] and args.peer_threads is None  # peers get oodguard's threads unless told otherwise
    assert serve.parse_args(["--bundles", "a,b", "--threads", "1,2"]).threads == [1, 2]  # one count per bundle
    assert serve.parse_args(["--threads", "2", "--peer-threads", "0"]).peer_threads == 0
    for bad in (["--systems", "nginx"], ["--bundles", "a,b", "--threads", "1,2,3"], ["--threads", "0"], ["--threads", "x"]):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


def test_peers_and_torchserve_get_the_bundles_thread_budget(tmp_path):
    bundle = serve_bundles.BenchBundle(name="b", path=tmp_path, description="", run_dir=None)
    args = serve.parse_args(["--bundles", "b", "--threads", "2"])
    specs = {s.system: s for s in serve.systems_for(bundle, 2, args, tmp_path) if not isinstance(s, tuple)}
    assert specs["oodguard"].argv[specs["oodguard"].argv.index("--threads") + 1] == "2"
    assert specs["fastapi-onnx"].argv[-2:] == ["--threads", "2"]
    args = serve.parse_args(["--bundles", "b", "--threads", "2", "--peer-threads", "1"])
    specs = {s.system: s for s in serve.systems_for(bundle, 2, args, tmp_path) if not isinstance(s, tuple)}
    assert specs["fastapi-onnx"].argv[-2:] == ["--threads", "1"]


# -- bench/train.py arithmetic (no training here) ------------------------------------------------------------


def _train_row(model: str, method: str, variant: str, seconds: float | None, error: str | None = None) -> dict:
    return {"model": model, "method": method, "variant": variant, "seconds_per_step": seconds, "error": error,
            "images_per_s": None if seconds is None else 64 / seconds, "all_images_per_s": None,
            "seconds_per_epoch": None, "wall_s": 1.0}


def test_train_relative_costs_and_variant_effects():
    from bench import train as bench_train

    rows = [_train_row("resnet18", "msp", "default", 1.0), _train_row("resnet18", "aloe", "default", 9.5),
            _train_row("resnet18", "msp", "threads_1", 1.6), _train_row("resnet18", "aloe", "compile", None, "BackendCompilerFailed: x")]
    assert bench_train.relative_costs(rows) == {("resnet18", "msp"): 1.0, ("resnet18", "aloe"): 9.5}
    effects = {r["variant"]: r for r in bench_train.variant_effects(rows)}
    assert effects["threads_1"]["speedup"] == pytest.approx(1.0 / 1.6)
    assert effects["compile"]["speedup"] is None
    md = bench_train.render_markdown({"command": "c", "timed_steps": 10, "results": rows, "environment": {
        "cpu": "cpu", "cores": 2, "torch": "t", "gomp_spincount": "10000", "omp_wait_policy": "unset", "load_average_start": []}})
    assert "| resnet18 | aloe | 9.500 | 6.7 |" in md and "| 9.50× | 14.30 | 0.66× |" in md  # vs the reference's 14.3 s
    assert "failed: BackendCompilerFailed: x" in md


def test_train_plan_runs_compile_last_and_quick_is_small():
    from bench import train as bench_train

    args = bench_train.parse_args(["--models", "small_cnn,resnet18", "--methods", "msp,aloe"])
    runs = bench_train.plan(args)
    assert runs[:4] == [("small_cnn", "msp", "default"), ("small_cnn", "aloe", "default"),
                        ("resnet18", "msp", "default"), ("resnet18", "aloe", "default")]
    assert [r for r in runs if r[2] == "compile"] == runs[-2:] == [("small_cnn", "msp", "compile"), ("small_cnn", "aloe", "compile")]
    quick = bench_train.plan(bench_train.parse_args(["--quick"]))
    assert {r[0] for r in quick} == {"small_cnn"} and not any(r[2] == "compile" for r in quick)


def test_train_recipe_and_settings_reach_every_run_and_the_report():
    from bench import train as bench_train

    args = bench_train.parse_args(["--recipe", "airbench", "--models", "airbench", "--methods", "aloe",
                                   "--set", "batch_size=128", "--set", "upload_augment_p=1", "--variants", "none"])
    assert args.recipe == "airbench" and args.settings == {"batch_size": 128, "upload_augment_p": 1}
    for bad in (["--set", "batch_size"], ["--set", "no_such_field=1"], ["--recipe", "nope"]):
        with pytest.raises(SystemExit):
            bench_train.parse_args(bad)
    row = {**_train_row("airbench", "aloe", "default", 2.0), "recipe": "airbench", "batch_size": 128,
           "outlier_batch_size": 128, "upload_augment_p": 1.0}
    md = bench_train.render_markdown({"command": "c", "timed_steps": 10, "results": [row], "settings": args.settings,
                                      "environment": {"cpu": "cpu", "cores": 2, "torch": "t", "gomp_spincount": "1",
                                                      "omp_wait_policy": "unset", "load_average_start": []}})
    assert "airbench recipe: batch 128 in + 128 out, 100% of images re-rendered as uploads" in md
    assert "batch_size = 128" not in md  # said once, from the measured rows


def test_batching_headroom_is_the_model_batch_ratio():
    bundle = {"ceiling_images_per_s": 300.0, "ceiling_batch1": {"images_per_s": 250.0}, "intra_op_threads": 2}
    text = serve_report.batching_headroom(bundle)
    assert "**1.20×**" in text and "2 intra-op" in text
    assert serve_report.batching_headroom({"ceiling_images_per_s": 300.0}) is None  # older reports: no line


def test_compare_revisions_serves_each_revision_from_its_own_worktree(tmp_path):
    """Two revisions' servers side by side: each answers from its own checkout, the worktrees go away."""
    import subprocess

    from bench import compare_revisions

    bundle = make_tiny_bundle(tmp_path / "tiny", name="tiny", version="1")
    out = tmp_path / "ab.json"
    assert compare_revisions.main(["HEAD", "HEAD", "--bundle", str(bundle), "--rounds", "1", "--duration", "1",
                                   "--warmup", "2", "--concurrency", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["revisions"] == {"A": "HEAD", "B": "HEAD"}
    for key in ("A", "B"):
        assert result["rounds"][key][0]["errors"] == 0 and result["rounds"][key][0]["requests_per_s"] > 0
    trees = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, check=True).stdout
    assert "oodguard-compare-" not in trees


def test_soak_tail_attribution_names_the_kind_that_overlaps_the_slow_requests():
    from bench.soak_hostile import Phase, tail_attribution

    phase = Phase()
    # 200 valid requests of 10 ms, one every 0.1 s; the two slow ones (0.5 s) start inside "slow-kind" spans
    phase.valid_spans = [(t / 10, t / 10 + (0.5 if t in (50, 150) else 0.01)) for t in range(200)]
    phase.hostile_spans = [("slow-kind", 4.95, 5.05), ("slow-kind", 14.95, 15.05),  # overlap 2 of 200 requests
                           ("busy-kind", 0.0, 20.0)]  # overlaps everything: lift 1
    out = tail_attribution(phase, quantile=99.0)
    assert out["tail_n"] == 2 and out["cut_ms"] >= 10
    slow, busy = out["kinds"]["slow-kind"], out["kinds"]["busy-kind"]
    assert slow["tail_share"] == 1.0 and slow["all_share"] == 0.01 and slow["lift"] == 100.0
    assert busy["tail_share"] == 1.0 and busy["all_share"] == 1.0 and busy["lift"] == 1.0
    assert tail_attribution(Phase()) == {}
