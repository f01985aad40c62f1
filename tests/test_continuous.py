"""Continuous (iteration-level) batching on a slot KV cache, through the serving engine.

Requests arrive while others decode; every request's tokens must equal what one-shot generation
gives it alone (greedy: the same ids; seeded sampling: the same draws). Real gloo groups (1, 2
and 4 ranks) spawned by the engine, tiny random checkpoints built from configs and saved with
``save_pretrained``, fp32. The small cache (4 slots, 12-token step budget) makes requests queue
for slots and prompts prefill in chunks.
"""

import time

import pytest
import torch

from distgen.config import ConfigError, ParallelConfig
from distgen.engine import Engine, EngineConfig
from distgen.models.llama import Segment, SlotContext
from distgen.models.tiny_llm import save_chat_llama
from distgen.runtime.continuous import ContinuousConfig
from distgen.runtime.resident import ResidentJob
from distgen.runtime.text import TextJob, TextRequest

pytestmark = pytest.mark.timeout(400)

PROMPTS = [tuple(range(5, 5 + n)) for n in (3, 17, 1, 9, 26, 6)]
NEW_TOKENS = [7, 12, 5, 9, 4, 10]
SMALL = ContinuousConfig(max_num_seqs=4, max_num_batched_tokens=12, max_model_len=48)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    llama = str(save_chat_llama(root / "llama", num_hidden_layers=4))
    qwen = str(save_chat_llama(root / "qwen2", family="qwen2", num_hidden_layers=4, seed=1))
    return {"llama": llama, "qwen2": qwen}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(7)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48))
    with torch.no_grad():  # transformers initialises Qwen routers to zero (all ties)
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    directory = tmp_path_factory.mktemp("continuous-moe") / "qwen2-moe"
    model.save_pretrained(directory)
    return str(directory)


def _engine(model: str, parallel: str, nproc: int, continuous, ladder: int | None = None) -> Engine:
    base = TextJob(requests=(), parallel=ParallelConfig.parse(parallel), model=model, ladder_layers=ladder,
                   comm_timeout_s=60.0)
    job = ResidentJob(workload="text", base=base, continuous=continuous)
    return Engine(EngineConfig(job=job, nproc=nproc, launcher="spawn", max_queued=64, max_restarts=0,
                               threads_per_rank=1)).start()


def _request(i: int, **changes) -> TextRequest:
    fields = dict(prompt_ids=(PROMPTS[i],), max_new_tokens=NEW_TOKENS[i], eos_token_ids=())
    return TextRequest(**(fields | changes))


def _one_shot(model: str, requests: list[TextRequest]) -> list[list[list[int]]]:
    """Each request alone, request-level on one rank: what `distgen generate text` gives it."""
    engine = _engine(model, "", 1, None)
    try:
        return [engine.submit("text", r).wait(120)[1]["tokens"] for r in requests]
    finally:
        engine.stop(drain_timeout_s=0)


def _staggered(engine: Engine, requests: list[TextRequest]) -> list:
    """Submit two requests, then the rest one by one as soon as the previous one streams a token."""
    handles = [engine.submit("text", requests[0]), engine.submit("text", requests[1])]
    for request in requests[2:]:
        for event in handles[-1].events(timeout=120):
            if event[0] in ("progress", "result"):
                break
        handles.append(engine.submit("text", request))
    return [h.wait(120) for h in handles]


@pytest.fixture(scope="module")
def references(checkpoints, moe):
    requests = [_request(i) for i in range(len(PROMPTS))]
    return {name: _one_shot(path, requests) for name, path in (*checkpoints.items(), ("moe", moe))}


CASES = [  # (checkpoint, parallel, ranks, ladder layers); the slow ones are covered by a composite in make test
    ("llama", "", 1, None),
    pytest.param("qwen2", "", 1, None, marks=pytest.mark.slow),
    pytest.param("llama", "tp=2", 2, None, marks=pytest.mark.slow),
    ("llama", "tp=2", 2, 4),
    pytest.param("llama", "pp=2", 2, None, marks=pytest.mark.slow),
    ("qwen2", "tp=2,pp=2", 4, None),
    ("moe", "ep=2", 2, None),
]


def _case_id(name, parallel, nproc, ladder) -> str:
    return f"{name}-{parallel or 'tp1'}{'-ladder' if ladder else ''}"


@pytest.mark.parametrize("name,parallel,nproc,ladder", CASES,
                         ids=[_case_id(*(c.values if hasattr(c, "values") else c)) for c in CASES])
def test_requests_joining_mid_decode_get_their_one_shot_tokens(checkpoints, moe, references, name, parallel, nproc,
                                                               ladder):
    model = moe if name == "moe" else checkpoints[name]
    if ladder:  # Ladder is a different function: its reference is Ladder one-shot
        engine = _engine(model, "", 1, None, ladder=ladder)
        try:
            expected = [engine.submit("text", _request(i)).wait(120)[1]["tokens"] for i in range(len(PROMPTS))]
        finally:
            engine.stop(drain_timeout_s=0)
    else:
        expected = references[name]
    engine = _engine(model, parallel, nproc, SMALL, ladder=ladder)
    try:
        answers = _staggered(engine, [_request(i) for i in range(len(PROMPTS))])
    finally:
        engine.stop(drain_timeout_s=0)
    assert [a[0] for a in answers] == ["result"] * len(PROMPTS), answers
    assert [a[1]["tokens"] for a in answers] == expected
    assert [len(a[1]["tokens"][0]) for a in answers] == NEW_TOKENS


def test_seeded_sampling_and_several_rows_equal_one_shot(checkpoints):
    model = checkpoints["llama"]
    requests = [_request(1, temperature=0.9, top_p=0.8, seed=11),
                _request(3, prompt_ids=(PROMPTS[3], PROMPTS[0]), temperature=1.0, seed=5),  # n = 2 rows
                _request(0, temperature=0.7, seed=2)]
    expected = _one_shot(model, requests)
    engine = _engine(model, "", 1, SMALL)
    try:
        answers = _staggered(engine, requests)
    finally:
        engine.stop(drain_timeout_s=0)
    assert [a[1]["tokens"] for a in answers] == expected


def test_cancel_mid_decode_frees_the_slot_and_a_full_cache_queues(checkpoints, references):
    """One slot: a long request is cancelled mid-decode, the queued ones then run and are unaffected."""
    model = checkpoints["llama"]
    engine = _engine(model, "", 1, ContinuousConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=48))
    try:
        long = engine.submit("text", _request(4, max_new_tokens=20))
        queued = [engine.submit("text", _request(i)) for i in (0, 2)]
        streamed = 0
        for event in long.events(timeout=120):
            if event[0] == "progress":
                streamed += 1
                if streamed == 3:
                    long.cancel()
            if event[0] in ("result", "cancelled", "error"):
                break
        assert event[0] == "cancelled"
        answers = [h.wait(120) for h in queued]
    finally:
        engine.stop(drain_timeout_s=0)
    assert [a[1]["tokens"] for a in answers] == [references["llama"][0], references["llama"][2]]


def test_slot_attention_equals_one_sequence_at_a_time(checkpoints):
    """The model-level contract: rows at different lengths in one forward (decodes + a prefill chunk)
    give the logits each sequence gets alone (fp32, 1e-5)."""
    from distgen.models.checkpoint import load_parameters, open_checkpoint
    from distgen.models.llama import build_model

    checkpoint = open_checkpoint(checkpoints["qwen2"])
    model = build_model(checkpoint.config)
    load_parameters(model, checkpoint, torch.float32, torch.device("cpu"))
    model.eval()
    prompts = [list(range(10, 10 + n)) for n in (5, 9, 4)]
    with torch.inference_mode():
        alone = []
        for p in prompts:
            cache = model.allocate_slot_cache(1, 32, torch.float32, torch.device("cpu"))
            ctx = SlotContext.build(model, [Segment(0, 0, len(p))], cache, torch.float32)
            alone.append(model(torch.tensor([p]), ctx, all_logits=True)[0])
        cache = model.allocate_slot_cache(3, 32, torch.float32, torch.device("cpu"))
        # slot 2: first two tokens; slot 0: all but the last; then one step with decodes and chunks together
        for segs, ids in (([Segment(2, 0, 2)], prompts[0][:2]), ([Segment(0, 0, 8)], prompts[1][:8])):
            model(torch.tensor([ids]), SlotContext.build(model, segs, cache, torch.float32))
        segs = [Segment(0, 8, 1), Segment(2, 2, 3), Segment(1, 0, 4)]
        ids = [prompts[1][8], *prompts[0][2:5], *prompts[2]]
        got = model(torch.tensor([ids]), SlotContext.build(model, segs, cache, torch.float32))
    assert got.shape == (3, 1, checkpoint.config.vocab_size)
    torch.testing.assert_close(got[0, 0], alone[1][8], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, 0], alone[0][4], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2, 0], alone[2][3], rtol=0, atol=1e-5)


def test_bad_limits_are_rejected_with_the_flag_named():
    with pytest.raises(ConfigError, match="--max-num-batched-tokens 4: must be at least --max-num-seqs"):
        ContinuousConfig(max_num_seqs=8, max_num_batched_tokens=4).validate(128)
    with pytest.raises(ConfigError, match="--max-model-len 4096"):
        ContinuousConfig(max_model_len=4096).validate(2048)
    with pytest.raises(ConfigError, match="--max-num-seqs"):
        ContinuousConfig(max_num_seqs=0).validate(128)
    assert ContinuousConfig().validate(1024).max_model_len == 1024
