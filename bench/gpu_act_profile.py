"""Where one policy.act() spends its time on the device used: stage by stage, and per operator.

    python bench/gpu_act_profile.py --preset blip2-opt-2.7b        # on CUDA when present
    python bench/gpu_act_profile.py --preset small --device cpu    # the same code path here

Stages are timed with a device sync between them (so they add up to slightly more than one act):
prepare (resize, normalise, tokens, host->device), backbone (the VLM forward), heads (actor
distribution + critic value + squashing), to_host (the numpy copies). Then torch.profiler over
--repeats acts: the operators with the most self CPU time and the most device time, and the share
of the wall clock the device was busy (low = the act is bound by Python/launch overhead, not by
the GPU's arithmetic). Needs only torch, transformers, peft (as bench/gpu_check.py). Writes one JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="blip2-opt-2.7b", help="backbone preset: tiny, small, blip2-opt-2.7b")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/act_profile_<preset>_<device>.json)")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ire_vla_ros.vla.action_spec import EE_DELTA_7D
    from ire_vla_ros.vla.backbone import BackboneConfig
    from ire_vla_ros.vla.policy import PolicyConfig, VLAPolicy
    from ire_vla_ros.vla.precision import autocast

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    lora = ".*language_model.*\\.(q_proj|v_proj)" if args.preset == "blip2-opt-2.7b" else "all-linear"
    with torch.device(device):
        policy = VLAPolicy(PolicyConfig(
            backbone=BackboneConfig(preset=args.preset, torch_dtype="bfloat16" if cuda else "float32"),
            action_spec=EE_DELTA_7D, joint_names=[f"joint{i}" for i in range(7)], lora_target_modules=lora))
    policy.to(device)
    policy.set_normalization(np.zeros(7), np.ones(7), np.zeros(7), np.ones(7))
    policy.eval()
    size = policy.backbone.image_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    state = rng.normal(size=7).astype(np.float32)
    instruction = "press the button from the top"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(5):  # warm-up
        policy.act(image, state, instruction)
    sync()

    stages: dict[str, list[float]] = {k: [] for k in ("prepare", "backbone", "heads", "to_host", "act")}
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            inputs = policy.backbone.prepare(image[None], [instruction])
            sync()
            t1 = time.perf_counter()
            with autocast(device):
                hidden, mask = policy.backbone(inputs)
            sync()
            t2 = time.perf_counter()
            state_n = policy.normalize_state(state[None])
            dist = policy.distribution(hidden, mask, state_n)
            a_n = policy.deterministic_action(dist.mean)
            value = policy.value(hidden, mask, state_n)
            action = policy.unnormalize_action(a_n)
            sync()
            t3 = time.perf_counter()
            action.float().cpu().numpy(), a_n.float().cpu().numpy(), value.float().cpu().numpy()
            t4 = time.perf_counter()
            policy.act(image, state, instruction)
            sync()
            t5 = time.perf_counter()
            for k, a, b in (("prepare", t0, t1), ("backbone", t1, t2), ("heads", t2, t3), ("to_host", t3, t4),
                            ("act", t4, t5)):
                stages[k].append((b - a) * 1e3)
    result: dict = {"preset": args.preset, "device": str(device), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_at_start": os.getloadavg()[0], "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "gpu": torch.cuda.get_device_name(device) if cuda else None,
                    "stage_ms_p50": {k: float(np.median(v)) for k, v in stages.items()},
                    "stage_ms_p95": {k: float(np.percentile(v, 95)) for k, v in stages.items()}}
    print("[act_profile] stages p50 ms:", {k: round(v, 2) for k, v in result["stage_ms_p50"].items()}, flush=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.repeats):
            policy.act(image, state, instruction)
        sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.repeats
    events = prof.key_averages()
    device_attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy_us = sum(getattr(e, device_attr, 0.0) for e in events if e.device_type.name == "CUDA") if cuda else None
    n_kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / args.repeats if cuda else None
    n_ops = sum(e.count for e in events if e.key.startswith("aten::")) / args.repeats

    def top(attr, n=15):
        rows = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)[:n]
        return [{"op": e.key[:80], "count_per_act": e.count / args.repeats,
                 "ms_per_act": getattr(e, attr, 0.0) / 1e3 / args.repeats} for e in rows]

    result.update({
        "profiled_act_wall_ms": wall_ms,
        "aten_ops_per_act": n_ops,
        "device_kernels_per_act": n_kernels,
        "device_busy_ms_per_act": busy_us / 1e3 / args.repeats if cuda else None,
        "device_busy_share": (busy_us / 1e3 / args.repeats) / wall_ms if cuda else None,
        "top_self_cpu": top("self_cpu_time_total"),
        "top_self_device": top(device_attr) if cuda else None,
        "loadavg_at_end": os.getloadavg()[0],
    })
    print(f"[act_profile] profiled act {wall_ms:.1f} ms, {n_ops:.0f} aten ops"
          + (f", {n_kernels:.0f} kernels, device busy {result['device_busy_ms_per_act']:.1f} ms "
             f"({100 * result['device_busy_share']:.0f} %)" if cuda else ""), flush=True)
    if cuda:  # the fix: the backbone replayed from a CUDA graph, side by side with eager, same process
        result.update(compare_cuda_graph(policy, image, state, instruction, args.repeats, sync))
        print(f"[act_profile] act p50 eager {result['eager_act_ms_p50']:.1f} ms vs CUDA graph "
              f"{result['graph_act_ms_p50']:.1f} ms ({result['graph_status']}; capture "
              f"{result['graph_capture_s']:.2f} s; max |hidden diff| {result['graph_max_abs_hidden_diff']:.2e}, "
              f"max |action diff| {result['graph_max_abs_action_diff']:.2e})", flush=True)
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"act_profile_{args.preset}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps({k: result[k] for k in ("top_self_cpu", "top_self_device")}, indent=1)[:6000])
    print(f"written: {out}")
    return 0


def compare_cuda_graph(policy, image, state, instruction, repeats, sync) -> dict:
    """act() latency with the backbone eager vs replayed from a CUDA graph (alternating blocks), and
    how far the graphed outputs are from the eager ones on the same input."""
    import torch

    with torch.no_grad():
        eager_hidden, _ = policy.encode(image[None], [instruction])
        eager_action = policy.act(image, state, instruction).action
    policy.enable_cuda_graphs()
    graphed = policy._graphed_backbone
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        graph_hidden, _ = policy.encode(image[None], [instruction])  # first call captures
    sync()
    capture_s = time.perf_counter() - t0
    graph_action = policy.act(image, state, instruction).action
    times: dict[str, list[float]] = {"eager": [], "graph": []}
    for block in range(4):
        for variant in ("eager", "graph"):
            policy._graphed_backbone = graphed if variant == "graph" else None
            for _ in range(repeats):
                sync()
                t = time.perf_counter()
                policy.act(image, state, instruction)
                sync()
                times[variant].append((time.perf_counter() - t) * 1e3)
    policy._graphed_backbone = graphed  # (the bench toggles the private attribute to alternate)
    return {
        "graph_status": policy.cuda_graph_status, "graph_capture_s": capture_s,
        "graph_replays": graphed.replays, "graph_eager_calls": graphed.eager_calls,
        **{f"{v}_act_ms_p50": float(np.median(times[v])) for v in times},
        **{f"{v}_act_ms_p95": float(np.percentile(times[v], 95)) for v in times},
        "graph_speedup_p50": float(np.median(times["eager"]) / np.median(times["graph"])),
        "graph_max_abs_hidden_diff": float((graph_hidden.float() - eager_hidden.float()).abs().max()),
        "hidden_abs_max": float(eager_hidden.float().abs().max()),
        "graph_max_abs_action_diff": float(np.abs(graph_action - eager_action).max()),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
