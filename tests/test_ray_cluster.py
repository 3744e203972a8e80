"""`--engine ray` on a multi-node Ray cluster in one host (`ray.cluster_utils.Cluster`).

The head node, where the driver lives, has no CPU for tasks; two worker nodes have one each.
So every block, the dedup signatures and the shuffle's partitions travel between raylets'
object stores, the code path of a real cluster, and the artifacts must still equal the local
ones byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from test_ray_engine import C4, SHAKESPEARE, WEB, assert_same_artifact, build

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
# Under `pytest -n 2 --dist loadgroup` (make test) every Ray test runs in one xdist worker, so
# one Ray runtime exists at a time on the 2-core machine.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    nodes = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20},
    )
    for _ in range(2):
        nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    ray.init(address=nodes.address, log_to_driver=False, logging_level="warning")
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.mark.slow
def test_three_stages_on_two_worker_nodes(cluster: object, tmp_path: Path) -> None:
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3 and ray.cluster_resources()["CPU"] == 2
    stages = [
        ("clean", WEB / "c4_demo.jsonl", "--set", "batch_docs=2"),
        ("dedup", C4),
        ("tokenize", SHAKESPEARE, "--vocab-size", "300", "--set", "txt_split=paragraph"),
    ]
    for verb, inp, *args in stages:
        local = build(verb, inp, "--out", tmp_path / f"{verb}-local", "-j", "1", *args)
        out = build(verb, inp, "--out", tmp_path / f"{verb}-ray", "--engine", "ray", *args)
        assert_same_artifact(local, out)
