import os
from glob import glob

from setuptools import find_packages, setup

package_name = "ire_vla_ros"

def model_files():
    """models/ keeps its sub-directories (a checkpoint holds lora_adapter/) in the share directory."""
    by_dir = {}
    for path in glob("models/**/*", recursive=True):
        if os.path.isfile(path):
            by_dir.setdefault(os.path.dirname(path), []).append(path)
    return [("share/" + package_name + "/" + d, files) for d, files in sorted(by_dir.items())]


NODES = ["policy_node", "recorder_node", "reward_node", "trainer_node", "sim_node", "teleop_node",
         "fake_robot_node"]

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "bench", "bench.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml")),
    ] + model_files(),
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="ire_vla_ros developers",
    maintainer_email="ire-vla-ros@example.com",
    description="iRe-VLA: VLA deployment and online RL improvement on ROS 2 robot arms",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": ["ire-vla = ire_vla_ros.cli:main"]
        + [f"{n} = ire_vla_ros.nodes.{n}:main" for n in NODES],
    },
)
