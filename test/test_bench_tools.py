"""The Stage 1 tuning tools, run for real at smoke size: bench_stage1_sparse.py trains and evaluates
a Stage 0 (no Stage 1: --algos with none), bench_heldout_by_placement.py re-runs its held-out
episodes with their placements, the iRe-VLA loop runs from it (--iterations), and
run_variants.py runs two config variants of SACfD from it side by side, one with a broken override."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = "button-press-topdown-v3"


def test_stage0_only_then_variants_side_by_side(tmp_path):
    env = {**os.environ, "IRE_VLA_BENCH_RESULTS": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    stage0 = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_stage1_sparse.py"), "--tasks", TASK, "--algos", "--demos", "2",
         "--eval-episodes", "2", "--set", "sft.steps=2",
         "--work", str(tmp_path / "work"), "--name", "stage0_only"],
        capture_output=True, text=True, timeout=600, env=env)
    assert stage0.returncode == 0, stage0.stdout[-2000:] + stage0.stderr[-2000:]
    only = json.loads((tmp_path / "results" / "stage0_only.json").read_text())
    assert only["tasks"][TASK]["stage0"]["episodes"] == 2 and only["tasks"][TASK]["algos"] == {}
    by_place = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_heldout_by_placement.py"), "--task", TASK, "--episodes", "2",
         "--checkpoint", str(tmp_path / "work" / TASK / "stage0"), "--label", "s0", "--name", "placement"],
        capture_output=True, text=True, timeout=600, env=env)
    assert by_place.returncode == 0, by_place.stdout[-2000:] + by_place.stderr[-2000:]
    placed = json.loads((tmp_path / "results" / "placement.json").read_text())["checkpoints"]["s0"]
    assert [e["seed"] for e in placed["episodes"]] == [10000, 10001]
    assert placed["success_rate"] == only["tasks"][TASK]["stage0"]["success_rate"]  # the same episodes
    assert all(len(e["placement"]) >= 3 for e in placed["episodes"])
    assert (tmp_path / "results" / "placement.png").stat().st_size > 1000
    smoke = "sac.critic_pretrain_steps=2,sac.distill_steps=2,sac.num_envs=2"
    loop = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_stage1_sparse.py"), "--tasks", TASK, "--algos", "sac", "--demos", "2",
         "--eval-episodes", "2", "--env-steps", "16", "--eval-every", "16", "--iterations", "2",
         "--work", str(tmp_path / "work"), "--name", "loop"] + [a for s in smoke.split(",") for a in ("--set", s)]
        + ["--set", "stage2_sft.steps=2"],
        capture_output=True, text=True, timeout=600, env=env)
    assert loop.returncode == 0, loop.stdout[-2000:] + loop.stderr[-2000:]
    res = json.loads((tmp_path / "results" / "loop.json").read_text())["tasks"][TASK]["algos"]["sac"]
    assert [c["stage"] for c in res["curve"]] == ["iter1_stage1"] * 2 + ["iter1_stage2"] + ["iter2_stage1"] * 2 + ["iter2_stage2"]
    assert [c["env_steps"] for c in res["curve"]] == [0, 16, 16, 16, 32, 32]
    first, second = res["stages"]
    assert first["demo_buffer_episodes"] == 2  # then the demos + the successes iteration 1 kept
    assert second["demo_buffer_episodes"] == 2 + first["stage2_online_episodes"]
    assert (tmp_path / "results" / "loop.png").stat().st_size > 1000
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_variants.py"), "--task", TASK, "--work-src",
         str(tmp_path / "work" / TASK), "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch"),
         "--env-steps", "32", "--eval-every", "16", "--eval-episodes", "2", "--name", "smoke",
         "--variant", f"ok={smoke}", "--variant", f"broken={smoke},sac.no_such_option=1"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "smoke.json").read_text())
    ok, broken = result["variants"]["ok"], result["variants"]["broken"]
    assert ok["finished"] and [c["env_steps"] for c in ok["heldout"]] == [0, 16, 32]
    assert ok["train"] and ok["train"][-1]["env_steps"] == 32
    assert (tmp_path / "out" / "smoke_ok.json").is_file()  # the finished variant's own bench JSON
    assert not broken["finished"] and broken["returncode"] not in (0, None) and broken["heldout"] == []
    assert "no_such_option" in broken["log_tail"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["smoke.json", "smoke_ok.json"]
    assert not (tmp_path / "results" / "stage0_only.png").exists()  # Stage 0 alone: no curve to draw
