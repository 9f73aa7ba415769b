"""Run bench_stage1_sparse.py config variants side by side, one process (one torch thread) each.

A tuning sweep on a many-core machine: every variant starts from the same cached Stage 0 and demos
(a copy of --work-src per variant, so their episode stores do not mix), runs until done or until
--deadline-s, and its log is parsed as it goes: a variant cut off by the deadline still reports the
held-out points and the training-success trace it reached. Writes <out>/<name>.json (per variant:
overrides, held-out curve, training trace, finished or not; the machine and its load) and keeps
each variant's log and, when it finished, its bench JSON.

  python bench/run_variants.py --task button-press-topdown-v3 \\
      --work-src runs/bench_stage1_sparse/button-press-topdown-v3 --out runs/sweep --env-steps 8192 \\
      --variant base --variant dropout=sac.critic_dropout=0.01 --variant slow_actor=sac.lr_actor=1e-4
A variant is NAME or NAME=KEY=VALUE[,KEY=VALUE...] (the keys of bench_stage1_sparse.py's --set).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
HELDOUT = re.compile(r"held-out success ([0-9.]+)")
TRAIN = re.compile(r"stage1 (\d+)/\d+ steps, train success ([0-9.]+), Q ([-0-9.na]+), alpha ([-0-9.na]+)")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SystemExit(f"variant name {name!r}: letters, digits, '_', '.', '-' only")
    return name, [s for s in sets.split(",") if s]


def parse_log(text: str, eval_every: int) -> dict:
    """Held-out points (the first is Stage 1's start, then one per eval_every) and the training trace."""
    stage1 = text.split("] Stage 0: ", 1)[-1]  # a Stage 0 evaluation (no cached one) comes before it
    heldout = [float(m) for m in HELDOUT.findall(stage1)]
    train = [{"env_steps": int(s), "train_success_rate": float(r), "q_mean": float(q), "alpha": float(a)}
             for s, r, q, a in TRAIN.findall(text)]
    return {"heldout": [{"env_steps": i * eval_every, "success_rate": v} for i, v in enumerate(heldout)],
            "train": train}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--work-src", type=Path, required=True, help="a task's work dir with demos/ and stage0/")
    ap.add_argument("--out", type=Path, required=True, help="the summary JSON (and finished variants' bench JSONs)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="work copies and logs (default: --out); keep --out small where it is copied back")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME[=KEY=VALUE,...]")
    ap.add_argument("--env-steps", type=int, default=8192)
    ap.add_argument("--eval-every", type=int, default=2048)
    ap.add_argument("--eval-episodes", type=int, default=40)
    ap.add_argument("--deadline-s", type=float, default=3600.0, help="variants still running then are stopped")
    ap.add_argument("--name", default="variants")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("variant names must differ")
    if not (args.work_src / "stage0" / "latest").is_file() or not (args.work_src / "demos").is_dir():
        raise SystemExit(f"{args.work_src}: needs stage0/latest and demos/ (run bench_stage1_sparse.py once)")
    scratch = args.scratch or args.out
    args.out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    t0 = time.monotonic()
    for name, sets in variants:
        work = scratch / f"work_{name}" / args.task
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for item in args.work_src.iterdir():  # demos, Stage 0 and its cached evaluation; no old episodes
            if item.name in ("demos", "stage0"):
                shutil.copytree(item, work / item.name)
            elif item.name.startswith("stage0_eval_"):
                shutil.copy2(item, work / item.name)
        cmd = [sys.executable, str(HERE / "bench_stage1_sparse.py"), "--tasks", args.task, "--algos", "sac",
               "--env-steps", str(args.env_steps), "--eval-every", str(args.eval_every),
               "--eval-episodes", str(args.eval_episodes), "--work", str(work.parent), "--name", f"{args.name}_{name}"]
        for s in sets:
            cmd += ["--set", s]
        log = open(scratch / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, sets)
    print(f"{len(procs)} variants started", flush=True)
    while any(p.poll() is None for p, _, _ in procs.values()) and time.monotonic() - t0 < args.deadline_s:
        time.sleep(5)
    load_end = os.getloadavg()
    result = {"task": args.task, "env_steps": args.env_steps, "eval_every": args.eval_every,
              "eval_episodes": args.eval_episodes, "deadline_s": args.deadline_s, "machine": machine(),
              "loadavg_end": load_end, "variants": {}}
    for name, (p, log, sets) in procs.items():
        finished = p.poll() == 0
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        text = (scratch / f"{name}.log").read_text()
        bench_json = RESULTS / f"{args.name}_{name}.json"
        if bench_json.is_file():
            shutil.copy2(bench_json, args.out / bench_json.name)
        result["variants"][name] = {"overrides": sets, "finished": finished, "returncode": p.returncode,
                                    **parse_log(text, args.eval_every)}
        if not finished and p.returncode not in (None, -15, -9):
            result["variants"][name]["log_tail"] = text[-1500:]
    result["seconds"] = round(time.monotonic() - t0, 1)
    path = args.out / f"{args.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    for name, v in result["variants"].items():
        curve = " ".join(f"{c['success_rate']:.2f}" for c in v["heldout"])
        peak = max((t["train_success_rate"] for t in v["train"]), default=float("nan"))
        last = v["train"][-1]["train_success_rate"] if v["train"] else float("nan")
        print(f"{name:24s} held-out {curve:32s} train peak {peak:.2f} last {last:.2f} "
              f"{'done' if v['finished'] else 'cut'}", flush=True)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
