"""Memory of Stage 1's latent replay for the three backbone presets' latent sizes.

For each latent size (tokens x width, what the token learner consumes) a `LatentReplay` sized in
bytes is filled with N fp16 transitions in a fresh child process, and its peak RSS (VmHWM) is read
against the same child's RSS before allocation: bytes per transition (by the formula and as
measured), peak RSS, and what a fp32 T x m x d cache of the same transitions (the old
`cache_from_episodes` layout: hidden states only, no next latent) would take.

    python bench/bench_latent_memory.py                   # 2,000 transitions per preset
    python bench/bench_latent_memory.py --transitions 200 # smoke
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, write_result  # noqa: E402

# (tokens, width): tiny = 8 queries + 16 text tokens at d 64; small = 16 + 16 at d 512;
# blip2-opt-2.7b = 32 queries + 16 text tokens at d 2560 (OPT-2.7B's hidden size).
PRESETS = {"tiny": (24, 64), "small": (32, 512), "blip2-opt-2.7b": (48, 2560)}
STATE_DIM, ACTION_DIM = 7, 7

CHILD = r"""
import json, sys, torch
from ire_vla_ros.training.sac import LatentReplay, bytes_per_transition
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0][:-1], int(line.split()[1]) * 1024
tokens, width, n, s, a = (int(v) for v in sys.argv[1:6])
before = dict(hwm())
buf = LatentReplay(n * bytes_per_transition(tokens, width, s, a), tokens, width, s, a, tag="bench")
chunk = 64
for i in range(0, n, chunk):
    k = min(chunk, n - i)
    h = torch.randn(k, tokens, width).half()
    m = torch.ones(k, tokens, dtype=torch.bool)
    buf.add(hidden=h, mask=m, state=torch.zeros(k, s), action=torch.zeros(k, a), reward=torch.zeros(k),
            done=torch.zeros(k), next_hidden=h, next_mask=m, next_state=torch.zeros(k, s),
            behaviour_action=torch.zeros(k, a), mc_return=torch.zeros(k), success=torch.zeros(k), tag="bench")
after = dict(hwm())
print(json.dumps({"capacity": buf.capacity, "size": len(buf), "bytes_per_transition": buf.bytes_per_transition,
                  "rss_before": before["VmRSS"], "peak_rss": after["VmHWM"]}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transitions", type=int, default=2000)
    args = ap.parse_args(argv)
    rows = {}
    for name, (tokens, width) in PRESETS.items():
        out = subprocess.run([sys.executable, "-c", CHILD, str(tokens), str(width), str(args.transitions),
                              str(STATE_DIM), str(ACTION_DIM)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        grown = r["peak_rss"] - r["rss_before"]
        rows[name] = {
            "latent_tokens": tokens, "latent_width": width, "transitions": r["size"],
            "bytes_per_transition": r["bytes_per_transition"],
            "measured_bytes_per_transition": grown / r["size"],
            "peak_rss_mb": r["peak_rss"] / 2**20, "rss_growth_mb": grown / 2**20,
            "fp32_hidden_only_cache_mb": r["size"] * tokens * width * 4 / 2**20,
        }
        print(name, rows[name], flush=True)
    write_result("latent_memory", {"what": "LatentReplay (fp16 latents, sized in bytes) per preset latent size",
                                   "state_dim": STATE_DIM, "action_dim": ACTION_DIM, "presets": rows,
                                   "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
