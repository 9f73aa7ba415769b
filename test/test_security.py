"""Security checks (issue 11): no unpickling or remote code in the package; the SROS 2 policy
(config/sros2_policy.xml) is valid against the upstream schema and covers every topic and service
the nodes really use; with ROS_SECURITY_ENABLE=true and Enforce, a node without its enclave (or
with one this Fast DDS cannot load) does not start."""
from __future__ import annotations

import fnmatch
import io
import os
import re
import subprocess
import sys
import tokenize
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ros_harness import wait_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ire_vla_ros"
POLICY = REPO / "config" / "sros2_policy.xml"
SCHEMA = Path(__file__).resolve().parent / "data" / "sros2_policy.xsd"

# Loading weights or data that can run code: pickle and its relatives, torch.load (pickle inside),
# numpy's allow_pickle, transformers' trust_remote_code. Weights load through safetensors only.
UNSAFE = {
    "pickle-family import": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M),
    "pickle.load(s)": re.compile(r"\b(c?pickle|dill|cloudpickle|joblib|marshal)\.loads?\s*\("),
    "torch.load": re.compile(r"\btorch\.(serialization\.)?load\s*\(|from\s+torch\s+import\s+load\b"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True|[\"']trust_remote_code[\"']\s*:\s*True"),
}


def _code_without_comments(path: Path) -> str:
    """The source with comments blanked out (a comment saying "no pickle" is fine)."""
    lines = path.read_text().splitlines()
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return "\n".join(lines)


def find_unsafe_loading(root: Path) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*.py")):
        code = _code_without_comments(path)
        for what, pattern in UNSAFE.items():
            if pattern.search(code):
                hits.append(f"{path.relative_to(root.parent)}: {what}")
    return hits


def test_no_pickle_torch_load_or_remote_code_in_the_package():
    assert find_unsafe_loading(PACKAGE) == []


def test_the_unsafe_loading_check_finds_what_it_looks_for(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "ok.py").write_text("# never pickle.load(f) here\nfrom safetensors.torch import load_file\n")
    (pkg / "bad1.py").write_text("import pickle\n")
    (pkg / "bad2.py").write_text("import torch\nsd = torch.load(path, map_location='cpu')\n")
    (pkg / "bad3.py").write_text("m = AutoModel.from_pretrained(name, trust_remote_code=True)\n")
    (pkg / "bad4.py").write_text("x = np.load(p, allow_pickle=True)\n")
    hits = find_unsafe_loading(pkg)
    assert [h.split(":")[0] for h in hits] == ["pkg/bad1.py", "pkg/bad2.py", "pkg/bad3.py", "pkg/bad4.py"]


# -- SROS 2 policy ---------------------------------------------------------------------------
def _schema():
    xmlschema = pytest.importorskip("xmlschema", reason="pip install -r requirements-test.txt")
    return xmlschema.XMLSchema(str(SCHEMA))  # the xml: namespace import resolves offline (bundled)


def test_policy_is_valid_against_the_upstream_schema(tmp_path):
    schema = _schema()
    schema.validate(str(POLICY))
    # the schema does reject what sros2 would reject
    text = POLICY.read_text()
    for bad in (text.replace('publish="ALLOW"', 'publish="MAYBE"', 1),
                text.replace('version="0.2.0"', 'version="0.1.0"'),
                text.replace('<profile ns="/" node="trainer_node">', '<profile ns="/">'),
                text.replace("<enclaves>", "<contexts>").replace("</enclaves>", "</contexts>")):
        assert bad != text
        path = tmp_path / "bad.xml"
        path.write_text(bad)
        assert not schema.is_valid(str(path))


def policy_grants(path: Path = POLICY) -> dict[str, dict[str, list[str]]]:
    """node -> {publish|subscribe|reply|request: [absolute name patterns]} (sros2's `~` and relative
    names expanded for the profile's namespace and node)."""
    grants: dict[str, dict[str, list[str]]] = {}
    for profile in ET.parse(path).getroot().iter("profile"):
        node, ns = profile.get("node"), profile.get("ns").rstrip("/")
        mine = grants.setdefault(node, {k: [] for k in ("publish", "subscribe", "reply", "request")})
        for rule in profile:
            for kind in ("publish", "subscribe", "reply", "request"):
                if rule.get(kind) == "ALLOW":
                    for obj in rule:
                        name = obj.text.strip()
                        if name.startswith("~"):
                            name = f"{ns}/{node}{name[1:]}"
                        elif not name.startswith("/"):
                            name = f"{ns}/{name}"
                        mine[kind].append(name)
    return grants


def _allowed(patterns: list[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def test_policy_locks_the_dangerous_interfaces():
    g = policy_grants()
    ours = ["policy_node", "recorder_node", "reward_node", "trainer_node", "teleop_node", "sim_node"]
    commanders = {n for n in g if _allowed(g[n]["publish"], "/servo_node/delta_twist_cmds")}
    assert commanders == {"policy_node", "teleop_node"}  # the arm obeys these two only
    assert {n for n in g if _allowed(g[n]["publish"], "/gripper/command")} == {"policy_node", "teleop_node"}
    assert {n for n in g if _allowed(g[n]["publish"], "/estop")} == {"operator"}
    for node in ours:  # no node may change another node's parameters; only operators may
        for other in ours:
            assert not _allowed(g[node]["request"], f"/{other}/set_parameters"), (node, other)
    assert _allowed(g["operator"]["request"], "/trainer_node/set_parameters")
    # the trainer may only reload the policy and switch its exploration (online RL), nothing else
    assert sorted(g["trainer_node"]["request"]) == ["/policy_node/explore", "/policy_node/reload"]


def _live_interfaces(probe, node: str) -> dict[str, set[str]]:
    def names(pairs):
        return {name for name, _types in pairs}

    return {
        "publish": names(probe.get_publisher_names_and_types_by_node(node, "/")),
        "subscribe": names(probe.get_subscriber_names_and_types_by_node(node, "/")),
        "reply": names(probe.get_service_names_and_types_by_node(node, "/")),
        "request": names(probe.get_client_names_and_types_by_node(node, "/")),
    }


def test_policy_covers_every_live_topic_and_service(ros, tmp_path):
    """Each node, started with its defaults (and the sim/robot variants that add interfaces), is
    seen from the probe over DDS; every publisher, subscription, service and client it has must be
    allowed by its profile, else the node would be cut off under ROS_SECURITY_STRATEGY=Enforce."""
    from ire_vla_ros.nodes.policy_node import PolicyNode
    from ire_vla_ros.nodes.recorder_node import RecorderNode
    from ire_vla_ros.nodes.reward_node import RewardNode
    from ire_vla_ros.nodes.sim_node import SimNode
    from ire_vla_ros.nodes.teleop_node import TeleopNode
    from ire_vla_ros.nodes.trainer_node import TrainerNode

    ros.add(TrainerNode, checkpoints_dir=str(tmp_path / "ck"))
    ros.add(RewardNode, backend="sim")
    ros.add(RecorderNode, episodes_dir=str(tmp_path / "ep"), start_services=["/sim_node/reset",
                                                                             "/reward_node/start_episode"])
    ros.add(TeleopNode, mode="scripted_expert", action_spec="metaworld_4d")
    ros.add(PolicyNode, device="cpu")
    ros.add(SimNode)
    grants = policy_grants()
    nodes = ["trainer_node", "reward_node", "recorder_node", "teleop_node", "policy_node", "sim_node"]
    live = {}

    def discovered():
        for n in nodes:
            live[n] = _live_interfaces(ros.probe, n)
        return all("/rosout" in live[n]["publish"] and f"/{n}/get_parameters" in live[n]["reply"] for n in nodes)

    wait_for(discovered, 60, "every node's interfaces in the graph")
    missing = [f"{n} {kind} {name}" for n in nodes for kind, names in live[n].items() for name in sorted(names)
               if not _allowed(grants[n][kind], name)]
    assert missing == [], "not in config/sros2_policy.xml:\n" + "\n".join(missing)
    # positive control: the node-specific parts were seen too
    assert "/policy_node/reload" in live["policy_node"]["reply"]
    assert "/servo_node/delta_twist_cmds" in live["policy_node"]["publish"] | live["teleop_node"]["publish"]


# -- ROS_SECURITY_ENABLE ---------------------------------------------------------------------
NODE_SCRIPT = ("import rclpy\nrclpy.init()\nn = rclpy.create_node('policy_node')\n"
               "print('NODE UP', flush=True)\nn.destroy_node()\nrclpy.shutdown()\n")


def _run_node(env_extra: dict, enclave: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", NODE_SCRIPT, "--ros-args", "--enclave", enclave],
                          env=env, capture_output=True, text=True, timeout=120)


def test_enforced_security_refuses_a_node_without_its_enclave(ros_domain_id, tmp_path):
    keystore = tmp_path / "keystore"
    (keystore / "enclaves" / "ire_vla_ros" / "policy_node").mkdir(parents=True)
    secure = {"ROS_SECURITY_ENABLE": "true", "ROS_SECURITY_STRATEGY": "Enforce",
              "ROS_SECURITY_KEYSTORE": str(keystore)}
    # positive control: the same node starts without security
    plain = _run_node({}, "/ire_vla_ros/intruder")
    assert "NODE UP" in plain.stdout, plain.stderr[-2000:]
    # an enclave the keystore does not have: rcl refuses to start the node at all
    out = _run_node(secure, "/ire_vla_ros/intruder")
    assert out.returncode != 0 and "NODE UP" not in out.stdout
    assert "SECURITY ERROR" in out.stderr and "ire_vla_ros/intruder" in out.stderr, out.stderr[-2000:]


def test_enforced_security_with_an_unusable_enclave_fails_closed(ros_domain_id, tmp_path):
    """An enclave whose files this Fast DDS cannot use never yields an unsecured node. With the PyPI
    Fast DDS 2.14 wheel (built without -DSECURITY=ON, no builtin.PKI-DH plugin) every secure node is
    refused this way, so authentication between nodes cannot be exercised here (docs/ROBOT_SETUP.md)."""
    enclave = tmp_path / "keystore" / "enclaves" / "ire_vla_ros" / "policy_node"
    enclave.mkdir(parents=True)
    for name in ("identity_ca.cert.pem", "cert.pem", "key.pem", "permissions_ca.cert.pem",
                 "governance.p7s", "permissions.p7s"):
        (enclave / name).write_text("not a certificate\n")
    out = _run_node({"ROS_SECURITY_ENABLE": "true", "ROS_SECURITY_STRATEGY": "Enforce",
                     "ROS_SECURITY_KEYSTORE": str(tmp_path / "keystore")}, "/ire_vla_ros/policy_node")
    assert out.returncode != 0 and "NODE UP" not in out.stdout, out.stdout
    no_plugins = "doesn't have the security libraries" in out.stderr
    print("Fast DDS security plugins:", "absent (wheel built without SECURITY)" if no_plugins
          else "present; the invalid certificates were refused")


def test_bringup_runs_each_node_in_its_policy_enclave():
    """`bringup --processes` with ROS_SECURITY_ENABLE=true passes --enclave /ire_vla_ros/<node>; every
    node it can start (the fake robot aside: a test double, never on a secured robot) has that enclave."""
    from ire_vla_ros.nodes.bringup import ENCLAVE_ROOT, MODE_NODES, NodePlan, child_command

    enclaves = {e.get("path") for e in ET.parse(POLICY).getroot().iter("enclave")}
    for name in sorted(set(MODE_NODES["sim"]) | set(MODE_NODES["robot"])):
        cmd = child_command(NodePlan(name, "x.yaml"), [], None, secure=True)
        enclave = cmd[cmd.index("--enclave") + 1]
        assert enclave == f"{ENCLAVE_ROOT}/{name}" and enclave in enclaves, name
    assert "--enclave" not in child_command(NodePlan("policy_node", "x.yaml"), [], None)
