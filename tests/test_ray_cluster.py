"""`extractor run --engine ray` on a real two-node Ray cluster on this machine (`slow`).

Network: the cluster's tests run inside a private network namespace (`unshare --net`) in which only the
loopback interface exists, so every address Ray picks or advertises is 127.0.0.1 and no traffic can reach any
other address. `test_the_cluster_tests_run_in_a_private_network_namespace` starts pytest on this module there
(as root, which CI is); the tests marked `private_network` run only inside it (tests/conftest.py).

A head node and a second node are separate `ray start --block` processes on 127.0.0.1, one CPU each, token
authentication on (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN`: for both nodes and the driver), dashboards off.
Every node offers one unit of `worker_slot`, and the runs ask one per worker (`--worker-resources`), so the
two workers land on different nodes. Each fixture stops exactly the processes it started.

The reference is the local engine over the same records with the same buffers and batches (tiny BERT from
conftest): the cluster must store the same tables, each document exactly once, even when a node dies.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from extractor.cli import app
from extractor.corpus.engines.ray import BLOCK_NODES, FAULT_ENV
from tests.test_ray_engine import KEYS, SAMPLE_CORPUS, assert_each_document_once, table

pytestmark = pytest.mark.slow
inside = pytest.mark.private_network  # runs inside the namespace only (see the module docstring)

REPO_ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")  # the venv's `ray` command
LOOPBACK = "127.0.0.1"
LIMIT = 32  # documents per run: 8 blocks of 4 (two parts each: a paused block is part-way), both workers get blocks
SETTINGS = ["--set", "plots=false", "--set", "report=false", "--set", "buffer_size=4", "--set", "batch_size=2",
            "--set", "threads=1", "--limit", str(LIMIT), "--quiet"]
START_SECONDS = 90  # generous: two cores shared with other jobs
RUN_SECONDS = 240
# A line of Ray's C++ core log ("[2026-11-30 14:17:34,286 I 29141 29141] logging.cc:303: ..."): printed before the
# driver's log level applies (the log level notice; in a namespace without a route, that Ray fell back to
# hostname resolution for its own address). Never a traceback.
RAY_CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWE] \d+ \d+\] \w+\.cc:\d+: ")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    """A running two-node cluster: its GCS address, the environment its drivers need (token), its nodes."""

    address: str
    env: dict[str, str]
    nodes: dict[str, subprocess.Popen[bytes]]  # 'node_a' (head), 'node_b' → their `ray start --block` process
    node_ids: dict[str, str]  # 'node_a', 'node_b' → Ray node id

    def raylet(self, name: str) -> psutil.Process:
        """The raylet of node `name`: a child of the `ray start` process the fixture started."""
        children = psutil.Process(self.nodes[name].pid).children(recursive=True)
        (raylet,) = [p for p in children if p.name() == "raylet"]
        return raylet


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop one `ray start --block` process and everything under it: SIGTERM (Ray stops its own processes),
    then SIGKILL for whatever is left of its process tree (workers run in sessions of their own)."""
    if process.poll() is not None:
        return
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def node_ids(address: str, env: dict[str, str]) -> dict[str, str]:
    """Wait until both nodes are alive; their ids by custom resource name (a driver in another process, so
    this test process never joins a Ray instance)."""
    script = (
        "import json, time, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR')\n"
        f"deadline = time.time() + {START_SECONDS}\n"
        "while True:\n"
        "    nodes = {r: n['NodeID'] for n in ray.nodes() if n['Alive'] for r in n['Resources']"
        " if r.startswith('node_')}\n"
        "    if len(nodes) == 2 or time.time() > deadline: break\n"
        "    time.sleep(0.5)\n"
        "print(json.dumps(nodes))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=START_SECONDS + 60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    """Head (node_a) and a second node (node_b) on 127.0.0.1; stopped, and their temp dir removed, at the end."""
    # Ray's socket paths must stay under 107 characters: a short temp dir, not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))}
    common = ["--block", "--node-ip-address", LOOPBACK, "--num-cpus", "1", "--temp-dir", temp_dir,
              "--disable-usage-stats"]
    head = [str(RAY), "start", "--head", "--port", str(port), "--include-dashboard", "false",
            "--dashboard-host", LOOPBACK, "--dashboard-port", str(free_port()), *common,
            "--resources", json.dumps({"node_a": 1, "worker_slot": 1})]
    node = [str(RAY), "start", "--address", address, *common,
            "--resources", json.dumps({"node_b": 1, "worker_slot": 1})]
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    logs = Path(temp_dir) / "logs"
    logs.mkdir()
    try:
        for name, command in (("node_a", head), ("node_b", node)):
            with open(logs / f"{name}.log", "wb") as log:
                nodes[name] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
            if name == "node_a":
                wait_for_port(port, nodes[name], logs / "node_a.log")
        yield Cluster(address, env, nodes, node_ids(address, env))
    finally:
        for process in reversed(nodes.values()):  # the second node first, then the head
            stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + START_SECONDS
    while time.time() < deadline:
        assert process.poll() is None, f"ray start --head exited: {log.read_text()[-2000:]}"
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the head's GCS did not open port {port}: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def tiny_bert(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("bert")


@pytest.fixture(scope="module")
def local_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the local engine over the same records, buffers and batches."""
    output = tmp_path_factory.mktemp("local")
    result = CliRunner().invoke(app, run_args(output, tiny_bert, "local"))
    assert result.exit_code == 0, result.output
    return output


def run_args(output: Path, model: Path, engine: str, *options: str) -> list[str]:
    return ["run", "--input", str(SAMPLE_CORPUS), "--output", str(output), "--model", str(model),
            "--engine", engine, *SETTINGS, *options]


def ray_command(cluster: Cluster, output: Path, model: Path, *options: str) -> list[str]:
    """`extractor run --engine ray` against the cluster: two workers, one per node."""
    return [sys.executable, "-m", "extractor", *run_args(output, model, "ray"), "--address", cluster.address,
            "--workers", "2", "--worker-resources", "worker_slot=1", *options]


def fault_env(cluster: Cluster, markers: Path, **fault: object) -> dict[str, str]:
    """The driver's environment with one `Fault` armed (see extractor.corpus.engines.ray.Fault)."""
    return cluster.env | {FAULT_ENV: json.dumps({"times": 1, "markers": str(markers), **fault})}


def wait_for_marker(markers: Path, driver: subprocess.Popen[str]) -> tuple[int, int]:
    """The PID of the worker that tripped the fault, and the block it was in (the marker file holds both)."""
    deadline = time.time() + RUN_SECONDS
    while time.time() < deadline:
        files = sorted(markers.glob("failure-*")) if markers.exists() else []
        if files and files[0].read_text():
            pid, block = files[0].read_text().split()
            return int(pid), int(block)
        if driver.poll() is not None:
            raise AssertionError(f"the run ended before the fault fired: {driver.communicate()[1]}")
        time.sleep(0.2)
    raise AssertionError("no worker reached the fault")


def finish(driver: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, stderr = driver.communicate(timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired:
        driver.kill()
        _, stderr = driver.communicate()
        raise AssertionError(f"the run did not finish in {RUN_SECONDS} s: {stderr[-3000:]}") from None
    return driver.returncode, stderr


def assert_same_as_local(output: Path, local_output: Path) -> None:
    """Each document once; documents, tokens and associations equal the local engine's (values within 1e-5)."""
    assert_each_document_once(output, LIMIT)
    for name in ("documents", "tokens", "associations"):
        ours, theirs = table(output, name), table(local_output, name)
        assert not ours.duplicated(KEYS[name]).any(), f"{name}: a row stored twice"
        pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=1e-5, atol=1e-5, obj=name)


def block_nodes(output: Path) -> dict[str, str]:
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["engine"] == "ray"
    return manifest["provenance"][BLOCK_NODES]


@inside
def test_two_nodes_store_the_local_engines_tables(
    cluster: Cluster, tiny_bert: Path, local_run: Path, tmp_path: Path
) -> None:
    """Two workers, one per node, over 8 blocks: the same tables as the local engine, every block recorded
    with the node that ran it, and both nodes did work."""
    output = tmp_path / "run"
    result = subprocess.run(ray_command(cluster, output, tiny_bert), env=cluster.env, capture_output=True,
                            text=True, timeout=RUN_SECONDS)
    assert result.returncode == 0, result.stderr
    assert_same_as_local(output, local_run)
    nodes = block_nodes(output)
    assert sorted(nodes, key=int) == [str(b) for b in range(LIMIT // 4)], "a block without its node"
    assert set(nodes.values()) == set(cluster.node_ids.values()), "both nodes must have run blocks"


@inside
def test_second_driver_is_refused_while_a_ray_run_holds_the_folder(
    cluster: Cluster, tiny_bert: Path, local_run: Path, tmp_path: Path
) -> None:
    """While a Ray run's driver holds OUTPUT/.lock (its worker paused mid-block), a second `extractor run`
    into the same folder is refused with one line naming the holder; the first run then completes."""
    output, markers = tmp_path / "run", tmp_path / "markers"
    env = fault_env(cluster, markers, block=0, kind="pause", seconds=15)
    driver = subprocess.Popen(ray_command(cluster, output, tiny_bert), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for_marker(markers, driver)
        second = CliRunner().invoke(app, run_args(output, tiny_bert, "local", "--resume"))
        assert second.exit_code == 2, second.output
        assert second.stderr.strip().splitlines() == [
            f"error: output folder '{output}' is in use by another extractor process (PID {driver.pid}); "
            + second.stderr.split(f"(PID {driver.pid}); ", 1)[1].strip()
        ]
        returncode, stderr = finish(driver)
    finally:
        driver.kill()
    assert returncode == 0, stderr
    assert_same_as_local(output, local_run)


@inside
def test_ray_client_address_is_refused_in_one_line(tmp_path: Path) -> None:
    """Ray Client (ray://) is not supported (in Ray 2.60 it needs `ray[client]`, and the driver must share the
    output folder with the workers): one line that says what to pass instead, exit 2, nothing written."""
    output = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--input", str(SAMPLE_CORPUS), "--output", str(output),
                                      "--engine", "ray", "--address", "ray://127.0.0.1:10001"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --address: key 'address': Ray Client (ray://) is not supported")
    assert "--address auto or HOST:PORT" in line
    assert not output.exists()


@inside
def test_lost_node_blocks_move_to_the_surviving_node(tiny_bert: Path, local_run: Path, tmp_path: Path) -> None:
    """A worker on node_b pauses after committing a part of its block; the test kills node_b's raylet (the node
    is lost, its worker with it). Ray restarts that actor on node_b only, so the blocks lost with it (the paused
    one, and any Ray handed to the dead actor meanwhile) run again on node_a: the run completes, says in one
    warning line (no traceback of Ray's) that blocks moved, every document is stored exactly once, the tables
    equal the local engine's, and every block is recorded with the node that committed it, the lost ones node_a."""
    output, markers = tmp_path / "run", tmp_path / "markers"
    with two_node_cluster() as doomed:
        env = fault_env(doomed, markers, block=-1, kind="pause", node_resource="node_b")
        driver = subprocess.Popen(ray_command(doomed, output, tiny_bert), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            paused, paused_block = wait_for_marker(markers, driver)
            raylet = doomed.raylet("node_b")
            assert paused in {p.pid for p in raylet.children(recursive=True)}, "the paused worker is not node_b's"
            raylet.kill()
            returncode, stderr = finish(driver)
        finally:
            driver.kill()
    assert returncode == 0, stderr
    *ray_lines, line = stderr.strip().splitlines()
    # Besides our warning, only Ray's own core log lines from before its log level applied (at most two).
    assert all(RAY_CORE_LOG.match(ray_line) for ray_line in ray_lines) and len(ray_lines) <= 2, stderr
    assert "Traceback" not in stderr
    moved = re.fullmatch(r"warning: (\d) block\(s\) lost with their worker \(a crash, or a lost node\); running "
                         r"them once more on a new pool", line)
    assert moved and int(moved[1]) >= 1, line
    assert_same_as_local(output, local_run)
    nodes = block_nodes(output)
    assert sorted(nodes, key=int) == [str(b) for b in range(LIMIT // 4)], f"a block without its node: {nodes}"
    assert nodes[str(paused_block)] == doomed.node_ids["node_a"], "the lost block was not moved to node_a"


def test_the_cluster_tests_run_in_a_private_network_namespace() -> None:
    """Run this module's cluster tests in a network namespace with only `lo`: they must all pass there."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("a private network namespace needs root, unshare and ip (CI runs as root)")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow a new network namespace (unshare --net)")
    command = (f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider "
               f"{Path(__file__).relative_to(REPO_ROOT)}")
    env = {**os.environ, "EXTRACTOR_PRIVATE_NETWORK": "1"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a second node needs Ray's multi-node mode
    done = subprocess.run(["unshare", "--net", "sh", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert summary.startswith("4 passed"), summary
