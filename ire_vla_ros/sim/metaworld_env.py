"""Metaworld v3 tasks with camera images, joint-position state and a language instruction.

`MetaworldTaskEnv` is the simulated robot of the project (see docs/ARCHITECTURE.md, "sim"):

* observation = `Observation(image, state, instruction)`: a (H, W, 3) uint8 RGB camera image,
  the Sawyer's 9 joint positions (7 arm joints + 2 finger joints, names in `joint_names`) and
  the task's natural-language instruction (`TASK_INSTRUCTIONS`);
* action = 4-D `[dx, dy, dz, gripper]` in [-1, 1] (`METAWORLD_4D`);
* `reset(seed)` fixes the object/goal placement from the seed (Metaworld's own seeded
  sampling of its reset space), so seed k always gives the same scene and different seeds give
  different scenes. Training uses seeds 0..N, evaluation `heldout_seeds(n)` (10_000+).

Rendering uses our own `mujoco.Renderer` with shadows/reflections/skybox off and no
multisampling: ~4 ms per 64x64 frame on software Mesa instead of ~50 ms through gymnasium's
renderer (see bench/bench_render.py).

This module never imports rclpy.
"""
from __future__ import annotations

import atexit
import dataclasses
import ctypes.util
import os
import threading
import warnings
import weakref
from dataclasses import dataclass

# --- OpenGL back-end: must be decided before mujoco (or metaworld, which imports it) loads. ---
if "MUJOCO_GL" not in os.environ:
    if ctypes.util.find_library("EGL"):
        os.environ["MUJOCO_GL"] = "egl"
    elif ctypes.util.find_library("OSMesa"):
        warnings.warn(
            "ire_vla_ros.sim: libEGL not found, falling back to MUJOCO_GL=osmesa (slow software "
            "rendering). Install libegl1 (Mesa EGL) for faster offscreen rendering.",
            RuntimeWarning,
            stacklevel=2,
        )
        os.environ["MUJOCO_GL"] = "osmesa"
    else:
        # Still default to egl; Renderer creation will fail with a clear message (see _make_renderer).
        os.environ["MUJOCO_GL"] = "egl"
if os.environ["MUJOCO_GL"].lower() in ("egl", "osmesa"):
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"].lower())

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from ire_vla_ros.vla.action_spec import METAWORLD_4D, ActionSpec  # noqa: E402

#: Natural-language instruction per supported Metaworld v3 task.
TASK_INSTRUCTIONS: dict[str, str] = {
    "button-press-topdown-v3": "press the button from the top",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "door-open-v3": "open the door",
    "door-close-v3": "close the door",
    "reach-v3": "reach the goal position",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "plate-slide-v3": "slide the plate into the goal",
    "handle-press-v3": "press the handle down",
    "handle-pull-v3": "pull the handle up",
    "faucet-open-v3": "turn the faucet open",
    "faucet-close-v3": "turn the faucet closed",
    "lever-pull-v3": "pull the lever up",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
}

#: The Sawyer's actuated joints reported as `state` (7 arm + 2 finger joints), MuJoCo names.
SAWYER_JOINT_NAMES: tuple[str, ...] = (
    "right_j0", "right_j1", "right_j2", "right_j3", "right_j4", "right_j5", "right_j6",
    "r_close", "l_close",
)

#: Cameras defined in Metaworld's scene.
CAMERAS: tuple[str, ...] = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
#: Default camera; shows the table, the objects and the gripper for the supported tasks.
DEFAULT_CAMERA = "corner"
#: Cameras whose image MuJoCo returns upside down (their "up" axis points downwards); rotated 180 deg.
_ROTATE_180 = {"corner"}

#: First evaluation (held-out) seed; training uses seeds below it.
HELDOUT_SEED_OFFSET = 10_000


def train_seeds(n: int, start: int = 0) -> list[int]:
    """Seeds for training/demonstration episodes: start .. start+n-1 (must stay below the held-out range)."""
    if start + n > HELDOUT_SEED_OFFSET:
        raise ValueError(f"training seeds must stay below {HELDOUT_SEED_OFFSET}")
    return list(range(start, start + n))


def heldout_seeds(n: int, start: int = 0) -> list[int]:
    """Seeds for evaluation, disjoint from every training seed: 10_000+start .. 10_000+start+n-1."""
    return list(range(HELDOUT_SEED_OFFSET + start, HELDOUT_SEED_OFFSET + start + n))


@dataclass
class Observation:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    state: np.ndarray  # (J,) float32 joint positions
    instruction: str


def _expert_policy_for(task: str):
    """The scripted Metaworld policy of `task`, or None if Metaworld has none."""
    from metaworld.policies import ENV_POLICY_MAP

    cls = ENV_POLICY_MAP.get(task)
    return None if cls is None else cls()


def _make_renderer(model: mujoco.MjModel, height: int, width: int) -> mujoco.Renderer:
    # The offscreen buffer must be at least as big as the image.
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
    model.vis.quality.offsamples = 0  # no MSAA: the main cost on software Mesa
    try:
        renderer = mujoco.Renderer(model, height=height, width=width)
    except Exception as exc:  # EGL/OSMesa missing or unusable
        backend = os.environ.get("MUJOCO_GL", "")
        raise RuntimeError(
            f"Cannot create a MuJoCo offscreen renderer with MUJOCO_GL={backend!r} ({exc}). "
            "Install Mesa EGL (libegl1) or OSMesa (libosmesa6) and set MUJOCO_GL=egl or "
            "MUJOCO_GL=osmesa (and PYOPENGL_PLATFORM to the same value) before starting Python, "
            "or create the env with render=False."
        ) from exc
    scene_flags = renderer.scene.flags
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                 mujoco.mjtRndFlag.mjRND_SKYBOX, mujoco.mjtRndFlag.mjRND_FOG,
                 mujoco.mjtRndFlag.mjRND_HAZE):
        scene_flags[flag] = 0
    return renderer


def _release_gl_context() -> None:
    """Unbind the EGL context from the calling thread, so that the next render may come from any
    thread (an EGL context can be current in only one thread; rclpy executors call back from
    worker threads). Costs a few microseconds per frame. No-op for other GL back-ends."""
    if os.environ.get("MUJOCO_GL", "").lower() != "egl":
        return
    try:
        from mujoco import egl as _egl

        if _egl.EGL_DISPLAY is not None:
            E = _egl.EGL
            E.eglMakeCurrent(_egl.EGL_DISPLAY, E.EGL_NO_SURFACE, E.EGL_NO_SURFACE, E.EGL_NO_CONTEXT)
    except Exception:  # pragma: no cover - best effort
        pass


# Renderers still open at interpreter exit are closed before EGL's own atexit teardown runs
# (atexit is LIFO and mujoco.egl registers eglTerminate when the first context is made, i.e.
# before ours is registered below on first use).
_OPEN_ENVS: "weakref.WeakSet[MetaworldTaskEnv]" = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_all_at_exit() -> None:
    for env in list(_OPEN_ENVS):
        try:
            env.close()
        except Exception:
            pass


class MetaworldTaskEnv:
    """One Metaworld v3 task with image + joint-state observations and a language instruction."""

    def __init__(
        self,
        task: str,
        *,
        image_size: int | tuple[int, int] = 64,
        camera: str = DEFAULT_CAMERA,
        max_episode_steps: int = 150,
        seed: int = 0,
        render: bool = True,
        instruction: str | None = None,
        action_repeat: int = 1,
    ):
        global _ATEXIT_REGISTERED
        import metaworld  # heavy import, and after the MUJOCO_GL set-up above

        if task not in metaworld.MT1.ENV_NAMES:
            raise ValueError(f"unknown Metaworld v3 task {task!r}")
        if instruction is None:
            if task not in TASK_INSTRUCTIONS:
                raise ValueError(f"no instruction known for {task!r}; pass instruction=...")
            instruction = TASK_INSTRUCTIONS[task]
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}; choose one of {CAMERAS}")
        if max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1")
        if isinstance(image_size, int):
            self.image_hw = (int(image_size), int(image_size))
        else:
            self.image_hw = (int(image_size[0]), int(image_size[1]))

        self.task = task
        self.instruction = instruction
        if action_repeat < 1:
            raise ValueError("action_repeat must be >= 1")
        # Each policy action is applied `action_repeat` times (one camera frame per decision): a
        # shorter decision horizon for RL and fewer renders. One unit of dx then moves the mocap
        # action_repeat * 1 cm, which the action spec records for the ROS twist conversion.
        self.action_repeat = int(action_repeat)
        self.action_spec: ActionSpec = dataclasses.replace(
            METAWORLD_4D, translation_scale_m=METAWORLD_4D.translation_scale_m * self.action_repeat)
        self.joint_names: list[str] = list(SAWYER_JOINT_NAMES)
        self.camera = camera
        self.max_episode_steps = int(max_episode_steps)
        self.render_enabled = bool(render)

        self._renderer: mujoco.Renderer | None = None
        self._render_lock = threading.Lock()
        self._closed = False
        benchmark = metaworld.MT1(task, seed=0)
        self._env = benchmark.train_classes[task]()
        # Sets the task kwargs and partially_observable=False (the goal is in the raw observation,
        # which the scripted experts need).
        self._env.set_task(benchmark.train_tasks[0])
        # Sample placements from the env's own seeded RNG instead of the 50 frozen MT1 goals.
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        # Our own time limit is `max_episode_steps`; never let Metaworld's (500) raise.
        self._env.max_path_length = 2**31 - 1

        model = self._env.model
        self._qpos_idx = np.array([model.jnt_qposadr[model.joint(n).id] for n in self.joint_names])
        self._camera_id = model.camera(camera).id
        self._flip = camera in _ROTATE_180
        self._expert = _expert_policy_for(task)

        if self.render_enabled:
            self._renderer = _make_renderer(model, *self.image_hw)
            _release_gl_context()
            _OPEN_ENVS.add(self)
            if not _ATEXIT_REGISTERED:
                atexit.register(_close_all_at_exit)
                _ATEXIT_REGISTERED = True

        self._next_seed: int | None = int(seed)
        self._raw_obs: np.ndarray | None = None
        self._steps = 0
        self.seed: int | None = None
        self.placement: np.ndarray | None = None

    # ------------------------------------------------------------------ gym-like API
    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode. `seed` fixes the object/goal placement; None continues the RNG stream
        (the first reset without a seed uses the constructor's seed)."""
        self._check_open()
        if seed is None:
            seed = self._next_seed
        self._next_seed = None
        if seed is not None:
            self._env.seed(int(seed))
        self.seed = None if seed is None else int(seed)
        self._env._did_see_sim_exception = False
        raw, _ = self._env.reset()
        self._raw_obs = raw
        self.placement = np.array(self._env._last_rand_vec, dtype=np.float64)
        self._steps = 0
        return self._observation()

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict]:
        """Apply one 4-D action (clipped to [-1, 1]).

        Returns (obs, dense Metaworld reward, terminated=success, truncated=steps>=max_episode_steps,
        info) with info["success"] a bool.
        """
        self._check_open()
        if self._raw_obs is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape != (self.action_spec.dim,):
            raise ValueError(f"action must have shape ({self.action_spec.dim},), got {np.shape(action)}")
        a = np.clip(np.nan_to_num(a, nan=0.0), -1.0, 1.0)
        for _ in range(self.action_repeat):
            raw, reward, _, _, info = self._env.step(a)
            self._raw_obs = raw
            success = bool(info.get("success", 0.0) >= 1.0)
            if success:
                break
        self._steps += 1
        info = dict(info)
        info["success"] = success
        info["steps"] = self._steps
        info["action"] = a
        truncated = self._steps >= self.max_episode_steps
        return self._observation(), float(reward), success, truncated, info

    def expert_action(self) -> np.ndarray:
        """The scripted Metaworld policy's action for the latest observation, clipped to [-1, 1]."""
        if self._expert is None:
            raise RuntimeError(f"no scripted Metaworld policy for {self.task!r}")
        if self._raw_obs is None:
            raise RuntimeError("call reset() before expert_action()")
        with warnings.catch_warnings():
            # Metaworld's policies warn on most calls that their gains are "too high" (we clip).
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            a = self._expert.get_action(self._raw_obs)
        return np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)

    @property
    def has_expert(self) -> bool:
        return self._expert is not None

    @property
    def steps(self) -> int:
        return self._steps

    # ------------------------------------------------------------------ state access
    def joint_positions(self) -> np.ndarray:
        """The 9 Sawyer joint positions (`joint_names` order), float32."""
        return self._env.data.qpos[self._qpos_idx].astype(np.float32)

    def ee_position(self) -> np.ndarray:
        """Hand (end-effector) position in the world frame, metres, float64 xyz."""
        return np.array(self._env.get_endeff_pos(), dtype=np.float64)

    def render(self) -> np.ndarray:
        """Camera image (H, W, 3) uint8 RGB of the current state (zeros when render=False)."""
        self._check_open()
        with self._render_lock:
            if self._renderer is None:
                return np.zeros((*self.image_hw, 3), dtype=np.uint8)
            self._renderer.update_scene(self._env.data, camera=self._camera_id)
            try:
                img = self._renderer.render()
            finally:
                _release_gl_context()
        if self._flip:
            img = img[::-1, ::-1]  # rotate 180 degrees (a vertical flip alone would mirror the scene)
        return np.ascontiguousarray(img)

    @property
    def raw_observation(self) -> np.ndarray | None:
        """Latest raw Metaworld observation vector (39-D), for experts/debugging."""
        return self._raw_obs

    @property
    def unwrapped(self):
        """The underlying Metaworld env."""
        return self._env

    def _observation(self) -> Observation:
        return Observation(image=self.render(), state=self.joint_positions(), instruction=self.instruction)

    # ------------------------------------------------------------------ teardown
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("environment is closed")

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        lock = getattr(self, "_render_lock", None)
        if lock is not None:
            with lock:
                renderer, self._renderer = self._renderer, None
                if renderer is not None:
                    try:
                        renderer.close()
                    except Exception:
                        pass
        try:
            _OPEN_ENVS.discard(self)
        except Exception:
            pass
        env = getattr(self, "_env", None)
        if env is not None:
            try:
                env.close()
            except Exception:
                pass

    def __enter__(self) -> "MetaworldTaskEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

