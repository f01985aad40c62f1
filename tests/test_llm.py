"""LLM generation: our Llama-family model, tensor / pipeline parallelism and Ladder Residual.

Tiny random checkpoints (Llama with llama3 RoPE and biases, Mistral with a sliding window,
Qwen2 with tied embeddings, q/k/v biases, per-layer sliding windows and an odd vocabulary)
are built from configs, saved with ``save_pretrained`` and loaded back through the user's
path. References are transformers' own models loaded from the same directory. Exact layouts
must match to 1e-4 (fp32, max abs diff on logits) and produce identical greedy tokens.
Multi-rank runs are real gloo groups started by ``distgen.launch.local.spawn`` with timeouts.
"""

import json
import os

import pytest
import torch

from distgen.config import ConfigError, ParallelConfig
from distgen.launch.local import spawn
from distgen.models.checkpoint import CheckpointError, open_checkpoint
from distgen.runtime.dist import WorkerContext
from distgen.runtime.text import TextGenerator, TextJob, TextRequest, check_job

ATOL = 1e-4
PROMPTS = ((5, 17, 99, 3, 250, 42, 7), (11, 12, 13), (200, 1, 2, 3, 4))
NEW_TOKENS = 5
GREEDY = TextRequest(prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
SAMPLED = TextRequest(prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, seed=5)
ONE_RANK = WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _build(family: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return LlamaForCausalLM(LlamaConfig(vocab_size=256, rope_parameters=rope, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=False, **COMMON))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(vocab_size=256, sliding_window=4, **COMMON))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=251, tie_word_embeddings=True, use_sliding_window=True,
                                        sliding_window=4, max_window_layers=2, **COMMON))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, transformers model loaded from it)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("llm")
    out = {}
    for seed, family in enumerate(("llama", "mistral", "qwen2")):
        torch.manual_seed(seed)
        directory = root / family
        _build(family).save_pretrained(directory)
        out[family] = (str(directory), AutoModelForCausalLM.from_pretrained(directory).eval())
    return out


@torch.no_grad()
def hf_greedy(model, prompt, steps):
    """transformers' greedy continuation and its logits: (prompt logits, [step logits], tokens)."""
    ids = torch.tensor([prompt])
    prompt_logits = model(ids).logits[0]
    tokens, step_logits = [int(prompt_logits[-1].argmax())], []
    for _ in range(steps - 1):
        ids = torch.tensor([list(prompt) + tokens])
        logits = model(ids).logits[0, -1]
        step_logits.append(logits)
        tokens.append(int(logits.argmax()))
    return prompt_logits, step_logits, tokens


def compare_with_transformers(result, hf_model, request=GREEDY):
    """Max abs logit difference over every prompt position and step; asserts identical tokens."""
    prefill = torch.as_tensor(result["prefill_logits"] if isinstance(result, dict) else result.prefill_logits)
    steps = result["step_logits"] if isinstance(result, dict) else result.step_logits
    tokens = result["tokens"] if isinstance(result, dict) else result.tokens
    longest = prefill.shape[1]
    worst = 0.0
    for row, prompt in enumerate(request.prompt_ids):
        ref_prompt, ref_steps, ref_tokens = hf_greedy(hf_model, prompt, request.max_new_tokens)
        assert tokens[row] == ref_tokens, f"row {row}: {tokens[row]} vs transformers {ref_tokens}"
        worst = max(worst, (prefill[row, longest - len(prompt):] - ref_prompt).abs().max().item())
        for step, ref in enumerate(ref_steps):
            worst = max(worst, (steps[step][row] - ref).abs().max().item())
    return worst


def run_ranks(directory, parallel, requests=(GREEDY,), **job):
    config = ParallelConfig.parse(parallel)
    job = TextJob(requests=tuple(requests), parallel=config, model=directory, return_logits=True,
                  threads_per_rank=1, comm_timeout_s=60, **job)
    return spawn(job, config.world_size, timeout_s=120)["results"]


def run_one_rank(directory, request=GREEDY, **job):
    job = TextJob(requests=(request,), parallel=ParallelConfig({}), model=directory, **{"return_logits": True, **job})
    return TextGenerator(job, ONE_RANK).generate(request)


# ------------------------------------------------------------------------ one rank


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_one_rank_matches_transformers(checkpoints, family):
    directory, hf_model = checkpoints[family]
    result = run_one_rank(directory)
    diff = compare_with_transformers(result, hf_model)
    print(f"{family} 1 rank: max abs logit diff {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.timeout(60)
def test_generation_stops_at_eos_per_sequence(checkpoints):
    directory, hf_model = checkpoints["llama"]
    free = run_one_rank(directory).tokens
    # make row 0's second token the end of sequence: row 0 stops there, the others go on
    eos = free[0][1]
    request = TextRequest(prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,))
    stopped = run_one_rank(directory, request).tokens
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    for row in (1, 2):
        expected = free[row][: free[row].index(eos) + 1] if eos in free[row] else free[row]
        assert stopped[row] == expected


# ---------------------------------------------------------------- parallel layouts


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family,parallel", [("llama", "tp=2"), ("qwen2", "tp=2"), ("mistral", "pp=2"),
                                             ("llama", "tp=2,pp=2")])
def test_parallel_matches_transformers(checkpoints, family, parallel):
    directory, hf_model = checkpoints[family]
    requests = (GREEDY, SAMPLED) if parallel == "tp=2" else (GREEDY,)
    results = run_ranks(directory, parallel, requests)
    diff = compare_with_transformers(results[0], hf_model)
    print(f"{family} {parallel}: max abs logit diff vs transformers {diff:.2e}")
    assert diff <= ATOL
    if len(results) > 1:  # sampling draws the same tokens on every layout from the same seed
        assert results[1]["tokens"] == run_one_rank(directory, SAMPLED).tokens


@pytest.mark.timeout(180)
@pytest.mark.parametrize("parallel,ladder_layers", [("tp=2", 4), ("tp=2,pp=2", 3)])
def test_ladder_matches_single_rank_ladder(checkpoints, parallel, ladder_layers):
    """tp=2,pp=2 with 3 ladder layers puts a stage boundary inside the ladder region."""
    directory, _ = checkpoints["llama"]
    reference = run_one_rank(directory, ladder_layers=ladder_layers)
    standard = run_one_rank(directory)
    result = run_ranks(directory, parallel, ladder_layers=ladder_layers)[0]
    diff = (result["prefill_logits"] - reference.prefill_logits).abs().max().item()
    for ours, ref in zip(result["step_logits"], reference.step_logits, strict=True):
        diff = max(diff, (ours - ref).abs().max().item())
    apart = (reference.prefill_logits - standard.prefill_logits).abs().max().item()
    print(f"ladder {parallel} k={ladder_layers}: max abs diff vs 1-rank ladder {diff:.2e}; ladder vs standard {apart:.2e}")
    assert diff <= ATOL
    assert result["tokens"] == reference.tokens
    assert apart > 1e-2  # a different function from the standard wiring


# -------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from distgen.workloads.text import encode_prompts
    from distgen.models import smollm2
    from distgen.models.checkpoint import load_tokenizer

    directory = str(smollm2.model_dir())
    tokenizer = load_tokenizer(directory)
    ids = encode_prompts(tokenizer, ["What is the capital of France?"], "on", None)[0]
    return directory, tokenizer, TextRequest(prompt_ids=(tuple(ids),), max_new_tokens=8, eos_token_ids=(2,))


@pytest.mark.timeout(120)
def test_smollm2_conversion_matches_transformers_and_uses_chat_template(smollm2):
    from transformers import AutoModelForCausalLM

    directory, tokenizer, request = smollm2
    prompt = request.prompt_ids[0]
    assert prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert open_checkpoint(directory).config.num_heads == 9
    ours = run_one_rank(directory, request, return_logits=False).tokens[0]
    hf_model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    print("SmolLM2:", repr(tokenizer.decode(ours)))
    assert ours == ref


@pytest.mark.timeout(240)
@pytest.mark.parametrize("parallel", ["tp=3", "pp=2"])
def test_smollm2_parallel_same_greedy_tokens(smollm2, parallel):
    directory, _, request = smollm2
    reference = run_one_rank(directory, request, return_logits=False).tokens
    config = ParallelConfig.parse(parallel)
    job = TextJob(requests=(request,), parallel=config, model=directory, threads_per_rank=1, comm_timeout_s=120)
    assert spawn(job, config.world_size, timeout_s=200)["results"][0]["tokens"] == reference


# ------------------------------------------------------------------ bad input


def cli_error(capsys, *argv) -> str:
    from distgen.cli import main

    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_tp_must_divide_heads_names_valid_degrees(smollm2, capsys):
    err = cli_error(capsys, "generate", "text", "--parallel", "tp=2", "--max-new-tokens", "4")
    assert "tp=2" in err and "9 attention heads" in err and "3 KV heads" in err and "valid tp degrees: 1, 3" in err


def test_ladder_layers_and_prompt_length_checked(smollm2, capsys):
    err = cli_error(capsys, "generate", "text", "--ladder-layers", "31")
    assert "--ladder-layers 31" in err and "30 layers" in err
    err = cli_error(capsys, "generate", "text", "--chat", "off", "--prompt", "word " * 8300)
    assert "longer than the model's context of 8192 tokens" in err


def _job(directory, parallel="", **request):
    request = TextRequest(prompt_ids=((1, 2, 3),), **request)
    return TextJob(requests=(request,), parallel=ParallelConfig.parse(parallel), model=directory)


def test_pp_larger_than_layers_and_vocab_rule(checkpoints, tmp_path):
    directory, _ = checkpoints["llama"]
    with pytest.raises(ConfigError, match=r"pp=5.*4 layers"):
        check_job(_job(directory, "pp=5"), open_checkpoint(directory), 5)
    with pytest.raises(ConfigError, match="--max-new-tokens 100"):
        check_job(_job(directory, max_new_tokens=100), open_checkpoint(directory), 1)
    from distgen.models.tiny_llm import save_random_llama

    small_vocab = str(save_random_llama(tmp_path / "v2", vocab_size=2, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    request = TextRequest(prompt_ids=((1,),), max_new_tokens=1)
    job = TextJob(requests=(request,), parallel=ParallelConfig.parse("tp=4"), model=small_vocab)
    with pytest.raises(ConfigError, match="vocabulary"):
        check_job(job, open_checkpoint(small_vocab), 4)


def test_pipeline_stages_are_contiguous_and_balance_the_head(smollm2, checkpoints):
    from distgen.parallel.pipeline import stage_layers

    config = open_checkpoint(smollm2[0]).config
    # the tied 49152 x 576 head weighs as much as 8 of SmolLM2's layers
    assert stage_layers(config, 2) == [range(0, 19), range(19, 30)]
    for pp in range(1, config.num_layers + 1):
        stages = stage_layers(config, pp)
        assert len(stages) == pp and all(len(r) >= 1 for r in stages)
        assert [i for r in stages for i in r] == list(range(config.num_layers))
    tiny = open_checkpoint(checkpoints["llama"][0]).config
    assert stage_layers(tiny, 2) == [range(0, 2), range(2, 4)]


def test_missing_corrupt_and_unsupported_checkpoints(checkpoints, tmp_path):
    import shutil

    from distgen.models.tiny_llm import save_random_llama

    sharded = tmp_path / "sharded"
    save_random_llama(sharded, **{**COMMON, "vocab_size": 256})
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(sharded).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors") and p != "model.safetensors")
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    (sharded / "model.safetensors").unlink(missing_ok=True)
    assert open_checkpoint(str(sharded)).config.num_layers == 4  # sharded checkpoints load
    (sharded / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing safetensors file .*{shards[1]}"):
        open_checkpoint(str(sharded))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoints["mistral"][0], corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"corrupt safetensors file .*{weights}"):
        open_checkpoint(str(corrupt))

    other = tmp_path / "gpt2"
    shutil.copytree(checkpoints["mistral"][0], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        open_checkpoint(str(other))
    with pytest.raises(CheckpointError, match="missing .*config.json"):
        open_checkpoint(str(tmp_path))


# ------------------------------------------------------------------ benchmark


@pytest.mark.timeout(180)
def test_bench_text_reports_every_wiring_against_one_rank(capsys):
    from distgen.cli import main

    assert main(["bench", "text", "--preset", "tiny", "--nproc", "2", "--parallel", "tp=2", "--batch-size", "2",
                 "--max-new-tokens", "3", "--prompt-len", "4", "--repeats", "1", "--timeout", "150",
                 "--comm-timeout", "60"]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = {run["wiring"]: run["batches"][0] for run in report["runs"]}
    assert set(runs) == {"standard", "ladder", "no-comm"} and report["baseline"]["batches"][0]["batch_size"] == 2
    assert runs["standard"]["same_tokens_as_1_rank"]  # exact layout, greedy
    # 4 layers x 2 sub-blocks + the embedding all-reduced, plus the logits gather; no-comm keeps only the gather
    assert runs["standard"]["tp_collectives_per_step"] == runs["ladder"]["tp_collectives_per_step"] == 10
    assert runs["no-comm"]["tp_collectives_per_step"] == 1
    assert runs["standard"]["tp_bytes_sent_per_step"] > runs["no-comm"]["tp_bytes_sent_per_step"] > 0
    summary = report["ladder_summary"][0]
    assert {"ladder_speedup_over_standard", "all_reduce_wait_hidden_fraction",
            "fraction_of_no_comm_gap_captured"} <= set(summary)
