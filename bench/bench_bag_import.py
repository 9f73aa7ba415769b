#!/usr/bin/env python3
"""Bag import speed: `import_bag` vs reading the same bag alone, side by side, 640x480 rgb8.

Writes a teleop-like rosbag2 per storage (rosbags writer: camera rgb8 at --camera-hz, joint states
at 100 Hz, TwistStamped + gripper at --rate) into a temp dir, then alternates, --repeats times:
  read    every message of the bag read and deserialized (rosbags AnyReader), nothing else;
  import  `ire-vla episodes import-bag` (two passes, pairing, rgb8 decode, HDF5 lzf writes, finalize),
          also with `--compression none` and with `--image-size 224 224` (frames resized before storing).
Reports camera frames/s for both (frames in the bag / seconds), imported steps/s, and the ratio
import/read per storage (medians), with the load average at start and end. Writes
bench/results/bag_import.json.

    python bench/bench_bag_import.py                               # full: 900 frames (30 s at 30 Hz), 3 repeats
    python bench/bench_bag_import.py --frames 60 --repeats 1       # smoke
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

NS = 1_000_000_000


def write_bag(path: Path, storage: str, frames: int, camera_hz: float, rate: float, h: int, w: int) -> dict:
    from ire_vla_ros.episodes.mcap_export import BagWriter

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, 90)], -1).astype(np.int16)
    variants = [np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8) for _ in range(8)]
    t0 = 1_700_000_000 * NS
    dur = int(frames / camera_hz * NS)
    msgs = []
    joints = [f"joint_{i}" for i in range(7)]
    with BagWriter(path, storage) as bw:
        for i in range(frames):
            t = t0 + int(i * NS / camera_hz)
            msgs.append(("/camera/image_raw", t, bw.image(t, variants[i % len(variants)])))
        for k in range(int(dur * 100 / NS)):
            t = t0 + k * NS // 100
            msgs.append(("/joint_states", t, bw.joint_state(t, joints, np.sin(np.arange(7) + k * 0.01))))
        for k in range(int(dur * rate / NS)):
            t = t0 + int(k * NS / rate) + 3_000_000
            msgs.append(("/servo_node/delta_twist_cmds", t, bw.twist(t, [0.01, 0.0, -0.01], [0.0, 0.02, 0.0])))
            msgs.append(("/gripper/command", t, bw.float64(1.0 if k % 20 > 10 else -1.0)))
        msgs.sort(key=lambda m: m[1])
        for topic, t, m in msgs:
            bw.write(topic, t, m)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"frames": frames, "bytes": size, "messages": len(msgs)}


def time_read(bag: Path) -> float:
    from ire_vla_ros.episodes.bag_import import read_bag_messages

    t = time.perf_counter()
    n = 0
    for _ in read_bag_messages(bag):
        n += 1
    return time.perf_counter() - t


def time_import(bag: Path, out: Path, rate: float, **settings) -> tuple[float, int]:
    from ire_vla_ros.episodes.bag_import import BagImportConfig, import_bag

    cfg = BagImportConfig(instruction="bench", control_rate_hz=rate, **settings)
    t = time.perf_counter()
    res = import_bag(bag, out, cfg)
    dt = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return dt, res.n_steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=900)
    ap.add_argument("--camera-hz", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=10.0, help="control rate (imported steps per second of bag)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--storages", nargs="+", default=["mcap", "sqlite3"], choices=["mcap", "sqlite3"])
    ap.add_argument("--name", default="bag_import")
    args = ap.parse_args()
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="bench_bag_import_"))
    results = {}
    try:
        for storage in args.storages:
            bag = tmp / f"bag_{storage}"
            meta = write_bag(bag, storage, args.frames, args.camera_hz, args.rate, args.height, args.width)
            reads, imports, raw_imports, resized, steps = [], [], [], [], 0
            for r in range(args.repeats):  # alternate so load drift hits every column alike
                reads.append(time_read(bag))
                dt, steps = time_import(bag, tmp / f"out_{storage}_{r}", args.rate)
                imports.append(dt)
                raw_imports.append(time_import(bag, tmp / f"raw_{storage}_{r}", args.rate, compression=None)[0])
                resized.append(time_import(bag, tmp / f"rs_{storage}_{r}", args.rate, image_size=[224, 224])[0])
            read_s, import_s = statistics.median(reads), statistics.median(imports)
            results[storage] = {
                **meta, "imported_steps": steps,
                "read_only_s": reads, "import_s": imports,
                "read_only_frames_per_s": args.frames / read_s,
                "import_frames_per_s": args.frames / import_s,
                "import_steps_per_s": steps / import_s,
                "import_over_read_time": import_s / read_s,
                "import_uncompressed_s": raw_imports, "import_resized_224_s": resized,
                "import_uncompressed_frames_per_s": args.frames / statistics.median(raw_imports),
                "import_resized_224_frames_per_s": args.frames / statistics.median(resized),
            }
            shutil.rmtree(bag, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_result(args.name, {
        "what": "rosbag2 import vs reading the bag alone (camera frames/s, medians)",
        "image": f"{args.width}x{args.height} rgb8", "camera_hz": args.camera_hz, "control_rate_hz": args.rate,
        "repeats": args.repeats, "machine": info, "loadavg_at_end": os.getloadavg()[0], "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
