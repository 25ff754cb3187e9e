"""Data-parallel training: 2 CPU processes under torchrun (gloo) end with identical weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from oodguard.training.run_dir import load_checkpoint

_WORKER = textwrap.dedent("""
    import os, sys, torch
    from oodguard.training.config import resolve_config
    from oodguard.training.trainer import train

    data, out = sys.argv[1], sys.argv[2]
    cfg = resolve_config("cpu", method="aloe", data=data, outliers=data, out=out, calibration_size=40,
                         batch_size=16, outlier_batch_size=32, max_steps=14, progress=False, eval_test=False,
                         model_kwargs={"widths": [8, 16, 16], "stem": 8}, seed=5)
    result = train(cfg)
    torch.save(result.model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    # one write per line: both ranks share the pipe, and print() may interleave its pieces with the other's
    os.write(1, f"RANK {os.environ['RANK']} threads {torch.get_num_threads()} step {result.step}\\n".encode())
""")


@pytest.mark.slow
def test_two_process_ddp_on_cpu_gives_identical_weights(tiny_data_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(tiny_data_dir), str(run)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANK 0 threads 1 step 14" in proc.stdout and "RANK 1 threads 1 step 14" in proc.stdout
    r0 = torch.load(run / "rank0.pt", weights_only=True)
    r1 = torch.load(run / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # rank 0 alone wrote the checkpoint (its weights) and one log line per epoch
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and len(ck["per_rank"]) == 2 and ck["step"] == 14
    for k in r0:
        assert torch.equal(ck["model"][k], r0[k]), k
    lines = [json.loads(s) for s in (run / "log.jsonl").read_text().splitlines()]
    # 360 training images / 2 ranks / 16 per batch = 11 steps per epoch; epochs end at 11 and the run at 14
    assert [r["step"] for r in lines if "event" not in r] == [11, 14]
    config = json.loads((run / "config.json").read_text())
    assert config["environment"]["world_size"] == 2 and config["environment"]["backend"] == "gloo"
    # each rank saw its own shard: the data streams' augmentation generators differ per rank
    assert not torch.equal(ck["per_rank"][0]["in_stream"]["generator"], ck["per_rank"][1]["in_stream"]["generator"])
