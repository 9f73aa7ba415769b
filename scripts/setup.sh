#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system libraries for offscreen MuJoCo
# rendering (Mesa EGL/OSMesa), a virtualenv with every Python dependency pinned, and this
# package installed in editable mode. Re-running is cheap (pip sees everything installed).
#
# If ROS 2 is sourced (rclpy importable by python3), the venv sees the system site-packages
# and the PyPI ROS wheels are skipped, so the robot's own rclpy/cv_bridge/moveit_py are used.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

need_pkgs=()
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
have_lib libEGL.so.1 || need_pkgs+=(libegl1)
have_lib libGL.so.1 || need_pkgs+=(libgl1)
have_lib libOSMesa.so || need_pkgs+=(libosmesa6)
ls /usr/share/glvnd/egl_vendor.d/*mesa* >/dev/null 2>&1 || need_pkgs+=(libegl-mesa0 libgl1-mesa-dri)
python3 -c "import venv, ensurepip" 2>/dev/null || need_pkgs+=(python3-venv)
if ((${#need_pkgs[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing system packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "[setup] ERROR: missing system packages for offscreen rendering: ${need_pkgs[*]}" >&2
    echo "[setup] run: sudo apt-get install ${need_pkgs[*]}   (then re-run make)" >&2
    exit 1
  fi
fi

ros_sourced=0
if python3 -c "import rclpy" 2>/dev/null; then ros_sourced=1; fi
if [ ! -x "$VENV/bin/python" ]; then
  if [ $ros_sourced = 1 ]; then
    echo "[setup] ROS 2 is sourced: venv with --system-site-packages, using the system rclpy"
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$PIP install -q torch==2.13.0
$PIP install -q -r requirements.txt -r requirements-test.txt
if [ $ros_sourced = 0 ]; then
  $PIP install -q -r requirements-ros.txt
fi
$PIP install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import torch, transformers, peft, h5py, mujoco, metaworld, rclpy  # noqa: F401
print(f"[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, mujoco {mujoco.__version__}")
PY
