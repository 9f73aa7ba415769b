# Sourced by make/CI: keep DDS on loopback and give each run its own domain id.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
if [ -z "${ROS_DOMAIN_ID:-}" ]; then export ROS_DOMAIN_ID=$(( (RANDOM % 100) + 1 )); fi
export MUJOCO_GL=${MUJOCO_GL:-egl}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-$MUJOCO_GL}
