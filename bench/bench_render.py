#!/usr/bin/env python3
"""Render speed of a Metaworld camera image: gymnasium's renderer vs ours, side by side.

Variants, all on the same task/camera/size and the same simulated states:
  gymnasium    Metaworld env with render_mode="rgb_array" -> env.render()  (gymnasium MujocoRenderer)
  mj_default   plain mujoco.Renderer with the model's default visual settings (shadows, MSAA, ...)
  ours         MetaworldTaskEnv.render(): mujoco.Renderer, shadows/reflections/skybox off, offsamples=0

Writes bench/results/render.json (ms/frame per variant and size, ratio gymnasium/ours).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _time(fn, frames: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(frames):
        fn()
    return (time.perf_counter() - t0) / frames * 1000.0


def bench(task: str, camera: str, size: int, frames: int, warmup: int) -> dict:
    import metaworld
    import mujoco

    from ire_vla_ros.sim.metaworld_env import MetaworldTaskEnv

    # ours (also provides the simulated state all variants render)
    ours = MetaworldTaskEnv(task, image_size=size, camera=camera)
    ours.reset(0)
    for _ in range(20):
        ours.step(ours.expert_action())
    qpos = ours.unwrapped.data.qpos.copy()
    res = {"ours": _time(ours.render, frames, warmup)}

    # gymnasium's renderer on a Metaworld env of its own, put in the same state
    mt = metaworld.MT1(task, seed=0)
    genv = mt.train_classes[task](render_mode="rgb_array", camera_name=camera, width=size, height=size)
    genv.set_task(mt.train_tasks[0])
    genv.reset()
    genv.data.qpos[:] = qpos
    mujoco.mj_forward(genv.model, genv.data)
    img = genv.render()
    assert img.shape == (size, size, 3), img.shape
    res["gymnasium"] = _time(genv.render, frames, warmup)
    genv.close()

    # plain mujoco.Renderer with default flags, on our env's model/data (restore offsamples)
    model, data = ours.unwrapped.model, ours.unwrapped.data
    saved = model.vis.quality.offsamples
    model.vis.quality.offsamples = 4  # MuJoCo's default
    r = mujoco.Renderer(model, size, size)
    cam = model.camera(camera).id

    def mj_default():
        r.update_scene(data, camera=cam)
        return r.render()

    res["mj_default"] = _time(mj_default, frames, warmup)
    r.close()
    model.vis.quality.offsamples = saved
    ours.close()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="button-press-topdown-v3")
    p.add_argument("--camera", default="corner")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--frames", type=int, default=100, help="timed frames per variant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "render.json"))
    args = p.parse_args(argv)

    rows = []
    print(f"{'size':>5s} {'gymnasium':>10s} {'mj_default':>10s} {'ours':>8s} {'ratio':>6s}  (ms/frame)")
    for size in args.sizes:
        r = bench(args.task, args.camera, size, args.frames, args.warmup)
        ratio = r["gymnasium"] / r["ours"]
        rows.append({"size": size, "ms_per_frame": r, "ratio_gymnasium_over_ours": ratio})
        print(f"{size:5d} {r['gymnasium']:10.2f} {r['mj_default']:10.2f} {r['ours']:8.2f} {ratio:6.1f}x", flush=True)

    try:
        import mujoco

        mj_version = mujoco.__version__
    except Exception:  # pragma: no cover
        mj_version = None
    result = {
        "task": args.task, "camera": args.camera, "frames": args.frames, "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "mujoco": mj_version, "machine": platform.machine(), "cpus": os.cpu_count(), "results": rows,
        "ratio_gymnasium_over_ours": rows[0]["ratio_gymnasium_over_ours"] if rows else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
