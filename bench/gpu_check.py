"""A ready GPU check: the real-size model on one GPU, in one command, writing one JSON.

    python bench/gpu_check.py                      # blip2-opt-2.7b in bf16 on CUDA (about 5 min on one H100)
    python bench/gpu_check.py --preset small       # the same code path on CPU (fp32), ~1 min

Needs only torch, transformers, peft, safetensors (no ROS, no MuJoCo, nothing downloaded): the
backbone is the preset's BLIP-2 architecture with random init, so speed and memory are those of
the real model, the outputs are not. It measures, on the device used:
  - build: parameter count, seconds to build and move to the device
  - act: one observation -> one action (what the policy node runs per control tick), p50/p95 ms
  - sft_step: one Stage 0/2 step (LoRA + action head, AdamW) at --batch, seconds and peak memory
  - stage1_update: K minibatch updates of actor + critic with the VLM frozen, reading cached fp16
    latents vs re-running the frozen backbone for every minibatch (the iRe-VLA latent-cache argument),
    side by side, and the ratio
  - bytes per cached latent (fp16) for this preset
Result: bench/results/gpu_check_<preset>_<device>.json (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def percentile(values, q):
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="blip2-opt-2.7b", help="backbone preset: tiny, small, blip2-opt-2.7b")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--batch", type=int, default=8, help="SFT batch size")
    ap.add_argument("--act-repeats", type=int, default=30)
    ap.add_argument("--update-steps", type=int, default=8, help="Stage 1 minibatch updates per variant")
    ap.add_argument("--minibatch", type=int, default=32, help="Stage 1 minibatch size")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_check_<preset>_<device>.json)")
    args = ap.parse_args(argv)

    import peft
    import torch
    import transformers

    from ire_vla_ros.vla.action_spec import EE_DELTA_7D
    from ire_vla_ros.vla.backbone import BackboneConfig, count_parameters
    from ire_vla_ros.vla.policy import PolicyConfig, VLAPolicy
    from ire_vla_ros.vla.precision import LATENT_DTYPE, amp_dtype, autocast

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    result: dict = {"preset": args.preset, "device": str(device), "amp_dtype": str(amp_dtype(device)),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__, "cpu_count": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg()[0], "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(device)
        result["gpu_total_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def peak_gib():
        return torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    # ---- build ---------------------------------------------------------------------------------
    bcfg = BackboneConfig(preset=args.preset, torch_dtype="bfloat16" if cuda else "float32")
    result["backbone_parameters"] = count_parameters(BackboneConfig(preset=args.preset))
    joints = [f"joint{i}" for i in range(7)]
    # A real BLIP-2 puts LoRA on the language model's attention; the small presets everywhere.
    lora_targets = ".*language_model.*\\.(q_proj|v_proj)" if args.preset == "blip2-opt-2.7b" else "all-linear"
    t0 = time.perf_counter()
    with torch.device(device):  # random init directly on the GPU: seconds instead of minutes on CPU
        policy = VLAPolicy(PolicyConfig(backbone=bcfg, action_spec=EE_DELTA_7D, joint_names=joints,
                                        lora_target_modules=lora_targets))
    policy.to(device)
    policy.set_normalization(np.zeros(7), np.ones(7), np.zeros(7), np.ones(7))
    policy.eval()
    sync()
    result["build_seconds"] = time.perf_counter() - t0
    result["trainable_lora_parameters"] = sum(p.numel() for p in policy.lora_parameters())
    result["head_parameters"] = sum(p.numel() for p in policy.actor.parameters())
    size = policy.backbone.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(max(args.batch, args.minibatch), size, size, 3), dtype=np.uint8)
    states = rng.normal(size=(max(args.batch, args.minibatch), 7)).astype(np.float32)
    actions = rng.uniform(-0.5, 0.5, size=(max(args.batch, args.minibatch), 7)).astype(np.float32)
    instruction = "press the button from the top"
    print(f"[gpu_check] built {args.preset} ({result['backbone_parameters'] / 1e6:.1f} M params) on {device} "
          f"in {result['build_seconds']:.1f} s", flush=True)

    # ---- act latency -----------------------------------------------------------------------------
    def act_latencies_ms() -> list[float]:
        """act() as the policy node calls it (the backbone under autocast inside, heads fp32); the
        first 3 calls (warm-up; with CUDA graphs the capture) are excluded."""
        lat = []
        for i in range(args.act_repeats + 3):
            sync()
            t = time.perf_counter()
            policy.act(images[i % len(images)], states[i % len(states)], instruction, deterministic=True)
            sync()
            if i >= 3:
                lat.append((time.perf_counter() - t) * 1e3)
        return lat

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    lat = act_latencies_ms()
    result["act_ms_p50"], result["act_ms_p95"] = percentile(lat, 50), percentile(lat, 95)
    result["act_peak_gib"] = peak_gib()
    print(f"[gpu_check] act p50 {result['act_ms_p50']:.1f} ms p95 {result['act_ms_p95']:.1f} ms", flush=True)
    if cuda:  # what the policy node runs on CUDA: the backbone replayed from a CUDA graph (vla/cuda_graph.py)
        policy.enable_cuda_graphs()
        lat = act_latencies_ms()
        result["act_cuda_graph_status"] = policy.cuda_graph_status
        result["act_cuda_graph_ms_p50"], result["act_cuda_graph_ms_p95"] = percentile(lat, 50), percentile(lat, 95)
        policy.disable_cuda_graphs()  # the SFT and Stage 1 timings below are eager, as training runs
        print(f"[gpu_check] act with CUDA graph ({result['act_cuda_graph_status']}) p50 "
              f"{result['act_cuda_graph_ms_p50']:.1f} ms p95 {result['act_cuda_graph_ms_p95']:.1f} ms", flush=True)

    # ---- one SFT step (LoRA + head) ---------------------------------------------------------------
    from ire_vla_ros.training.sft import sft_loss

    policy.unfreeze_lora()
    policy.actor.train()
    opt = torch.optim.AdamW([{"params": policy.head_parameters(), "lr": 1e-4},
                             {"params": policy.lora_parameters(), "lr": 1e-4}])
    step_s = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    instr = [instruction] * args.batch
    for i in range(3):
        sync()
        t = time.perf_counter()
        with autocast(device):
            loss = sft_loss(policy, images[: args.batch], states[: args.batch], actions[: args.batch], instr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        step_s.append(time.perf_counter() - t)
    result["sft_step_seconds"] = min(step_s[1:])  # first step includes optimizer state allocation
    result["sft_step_seconds_all"] = step_s
    result["sft_batch"] = args.batch
    result["sft_peak_gib"] = peak_gib()
    result["sft_loss_finite"] = bool(torch.isfinite(loss).item())
    del opt
    policy.eval()
    policy.freeze_backbone()
    print(f"[gpu_check] SFT step {result['sft_step_seconds']:.3f} s at batch {args.batch}", flush=True)

    # ---- Stage 1 update: cached latents vs re-running the frozen backbone ---------------------------
    mb = args.minibatch
    instr = [instruction] * mb
    with torch.no_grad():
        hidden, mask = policy.encode(images[:mb], instr)
    cached = hidden.to(LATENT_DTYPE)
    result["latent_tokens"], result["latent_dim"] = int(hidden.shape[1]), int(hidden.shape[2])
    result["latent_bytes_fp16"] = int(cached[0].numel() * cached.element_size())
    state_n = policy.normalize_state(states[:mb])
    act_n = policy.normalize_action(actions[:mb])
    head_opt = torch.optim.Adam(list(policy.actor.parameters()) + list(policy.critic.parameters()), lr=3e-4)

    def update(h, m):
        dist = policy.distribution(h, m, state_n)
        q = policy.value(h, m, state_n)
        loss = -dist.log_prob(act_n).sum(-1).mean() + (q - 1.0).pow(2).mean()
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        head_opt.step()

    timings = {}
    for variant in ("cached", "recompute_backbone", "cached", "recompute_backbone"):
        sync()
        t = time.perf_counter()
        for _ in range(args.update_steps):
            if variant == "cached":
                h, m = cached, mask
            else:
                with torch.no_grad():  # encode() runs the backbone under autocast
                    h, m = policy.encode(images[:mb], instr)
            update(h, m)  # heads in fp32, as training/sac.py runs them
        sync()
        timings.setdefault(variant, []).append(time.perf_counter() - t)
    best = {k: min(v) for k, v in timings.items()}
    result["stage1_update_steps"], result["stage1_minibatch"] = args.update_steps, mb
    result["stage1_seconds_cached"] = best["cached"]
    result["stage1_seconds_recompute_backbone"] = best["recompute_backbone"]
    result["stage1_speedup_cached"] = best["recompute_backbone"] / best["cached"]
    result["peak_gib"] = peak_gib()
    result["loadavg_at_end"] = os.getloadavg()[0]
    print(f"[gpu_check] Stage 1 update: cached {best['cached']:.3f} s vs recompute "
          f"{best['recompute_backbone']:.3f} s = {result['stage1_speedup_cached']:.1f}x", flush=True)

    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"gpu_check_{args.preset}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float))
    os.replace(tmp, out)
    print(json.dumps(result, indent=2, default=float))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
