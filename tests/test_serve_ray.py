"""Resident groups on a real multi-node Ray: two raylets on this machine (``ray.cluster_utils.Cluster``),
each with 2 CPUs and 2 fake GPUs. A ``tp=2,pp=2`` plan must put each tensor-parallel pair on one
node (STRICT_PACK per tp group), and the group must then serve requests with the tokens of one
rank.
"""

import pytest
import torch

ray = pytest.importorskip("ray")

from distgen.config import ParallelConfig  # noqa: E402
from distgen.engine import Engine, EngineConfig  # noqa: E402
from distgen.launch.ray import placement_bundles  # noqa: E402
from distgen.models.tiny_llm import save_chat_llama  # noqa: E402
from distgen.runtime.dist import WorkerContext  # noqa: E402
from distgen.runtime.resident import ResidentJob  # noqa: E402
from distgen.runtime.text import TextGenerator, TextJob, TextRequest  # noqa: E402

pytestmark = [pytest.mark.serve, pytest.mark.ray, pytest.mark.timeout(600)]


def test_placement_bundles_pack_tp_groups():
    assert placement_bundles(ParallelConfig.parse("tp=2,pp=2"), 4) == [("STRICT_PACK", 2), ("STRICT_PACK", 2)]
    assert placement_bundles(ParallelConfig.parse("pp=4"), 4) == [("PACK", 4)]
    assert placement_bundles(ParallelConfig.parse("cfg=2,patch=2"), 4) == [("PACK", 4)]


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_tp_pairs_land_on_one_node_each_and_serve(tmp_path, two_node_cluster):
    model = str(save_chat_llama(tmp_path / "llama"))
    prompt = (5, 17, 99, 3, 42)
    request = TextRequest(prompt_ids=(prompt,), max_new_tokens=6)
    one_rank = WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    expected = TextGenerator(TextJob(requests=(), parallel=ParallelConfig({}), model=model), one_rank).generate(request)

    job = TextJob(requests=(), parallel=ParallelConfig.parse("tp=2,pp=2"), model=model, comm_timeout_s=60)
    engine = Engine(EngineConfig(job=ResidentJob("text", job), nproc=4, launcher="ray", start_timeout_s=300))
    engine.start()
    try:
        where = engine.group.where
        nodes = [w["node_id"] for w in where]
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3], nodes  # each tp pair on one node
        assert nodes[0] != nodes[2]  # 2 GPUs per node: the pairs must use both nodes
        assert all(len(w["gpu_ids"]) == 1 for w in where)  # one (fake) GPU per rank
        outcome = engine.submit("text", request).wait(timeout=120)
        assert outcome[0] == "result", outcome
        assert outcome[1]["tokens"] == expected.tokens
        assert engine.health()["status"] == "ok"
    finally:
        engine.stop()
