"""Where the package's shared files (config/, launch/, models/) live.

Installed by colcon they are in the ament share directory; in a source checkout (pip -e, tests)
they sit next to the Python package. Both are tried, share first.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = "ire_vla_ros"
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def share_dir() -> Path:
    try:  # ament_index_python exists wherever ROS 2 does; not a hard dependency of the core
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            share = Path(get_package_share_directory(PACKAGE))
            if (share / "config").is_dir():
                return share
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset (no ROS sourced)
            pass
    except ImportError:
        pass
    return SOURCE_ROOT


def config_path(name: str) -> Path:
    return share_dir() / "config" / name


def models_dir() -> Path:
    return share_dir() / "models"
