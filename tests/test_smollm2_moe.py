"""The embedded MoE model derived from SmolLM2 (MoEfication, distgen.models.smollm2_moe).

Fast tests derive from a truncated SmolLM2 (2-3 layers, a few short conversations) into a tmp
directory and load the result back the way a user's checkpoint is loaded:

* with every expert selected (top_k = E) the Qwen2-MoE checkpoint is the dense model again
  (transformers on both, fp32, max abs logit diff <= 1e-4): the neuron split, the doubled shared
  expert and the k-scaled experts are exact;
* with the default top_k, our runtime matches transformers on the same directory (<= 1e-4, same
  greedy tokens) and transformers' own MoE block gives the unweighted sum of the selected experts
  (the router-scale trick) to a relative error bounded by the routing spread;
* ``--model smollm2-moe`` resolves to the derived directory and generates through the CLI.

The full derivation (30 layers, 32 conversations; a few minutes on one thread) is ``slow``.
"""

import json

import pytest
import torch

from test_llm import ATOL, compare_with_transformers, run_one_rank

from distgen.models import smollm2
from distgen.models.smollm2_moe import Derivation, derive, read_report, smollm2_moe_dir
from distgen.runtime.text import TextRequest

SMALL = dict(prompts=4, new_tokens=16, router_steps=50, kmeans_iters=4, greedy_tokens=8)


def _chat_request(directory, question="What is the capital of France?", new_tokens=6):
    from distgen.workloads.text import encode_prompts
    from distgen.models.checkpoint import load_tokenizer

    ids = encode_prompts(load_tokenizer(directory), [question], "on", None)[0]
    return TextRequest(prompt_ids=(tuple(ids),), max_new_tokens=new_tokens)


@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    """A derivation with the default experts / top_k / shared expert on a 3-layer SmolLM2."""
    directory = tmp_path_factory.mktemp("smollm2-moe") / "moe"
    report = derive(directory, Derivation(layers=3, **SMALL))
    return str(directory), report


@pytest.mark.timeout(120)
def test_every_expert_selected_is_the_dense_model(tmp_path):
    from transformers import AutoModelForCausalLM

    settings = Derivation(layers=2, top_k=16, routing_spread=1e-8, **SMALL)
    report = derive(tmp_path / "moe", settings)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    dense = AutoModelForCausalLM.from_pretrained(smollm2.model_dir(), num_hidden_layers=2).eval()
    ids = torch.tensor([list(_chat_request(smollm2.model_dir()).prompt_ids[0])])
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    print(f"top_k = E: max abs logit diff vs the dense layers {diff:.2e}")
    assert diff <= ATOL
    assert report["drift"]["heldout_top1_agreement"] == 1.0
    assert report["drift"]["greedy"]["first_divergence"] == [settings.greedy_tokens]


@pytest.mark.timeout(120)
def test_derived_checkpoint_is_qwen2_moe_and_matches_transformers(derived):
    from distgen.models.checkpoint import open_checkpoint

    directory, report = derived
    checkpoint = open_checkpoint(directory)
    config, defaults = checkpoint.config, Derivation()
    assert config.architecture == "Qwen2MoeForCausalLM"
    assert not config.qkv_bias and config.tie_word_embeddings and config.num_layers == 3
    assert config.moe.num_experts == defaults.num_experts and config.moe.top_k == defaults.top_k
    assert config.moe.norm_topk_prob and config.moe.shared_intermediate_size == defaults.shared_neurons
    assert config.moe.expert_intermediate_size * defaults.num_experts + defaults.shared_neurons == 1536
    assert f"model.layers.2.mlp.experts.{defaults.num_experts - 1}.down_proj.weight" in checkpoint.files
    request = _chat_request(directory)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(directory).eval()
    diff = compare_with_transformers(run_one_rank(directory, request), hf_model, request)
    print(f"derived MoE: max abs logit diff ours vs transformers {diff:.2e}")
    assert diff <= ATOL
    # transformers' Qwen2-MoE block = shared + unweighted sum of the selected experts, within the spread
    routing = report["routing"]
    assert routing["max_weight_deviation"] <= 2 * defaults.routing_spread
    assert routing["block_max_rel_error"] <= 2 * defaults.routing_spread
    assert read_report(directory)["drift"] == report["drift"]


@pytest.mark.timeout(180)
def test_cli_model_name_resolves_to_the_derived_model(derived, monkeypatch, capsys):
    import distgen.models.smollm2_moe as smollm2_moe
    from distgen.cli import main
    from distgen.workloads.text import resolve_model

    directory, _ = derived
    monkeypatch.setattr(smollm2_moe, "smollm2_moe_dir", lambda settings=None: directory)
    assert resolve_model("smollm2-moe") == directory
    assert main(["generate", "text", "--model", "smollm2-moe", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "4", "--launcher", "spawn", "--timeout", "120"]) == 0
    assert f"model {directory}" in capsys.readouterr().err


def test_bad_settings_name_the_parameter(tmp_path):
    from distgen.config import ConfigError

    with pytest.raises(ConfigError, match="num_experts=10 must divide"):
        Derivation(num_experts=10).validate(1536)
    with pytest.raises(ConfigError, match="top_k"):
        Derivation(top_k=17).validate(1536)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_embedded_moe_drift_and_runtime():
    """The real derivation (cached per session): learned routing beats a random router, and the
    checkpoint runs in our runtime exactly as in transformers."""
    from transformers import AutoModelForCausalLM

    directory = str(smollm2_moe_dir())
    report = read_report(directory)
    print(json.dumps({k: report[k] for k in ("experts", "drift", "routing", "seconds")}, indent=1))
    perplexity = report["drift"]["heldout_perplexity"]
    assert perplexity["smollm2"] < perplexity["moe"] < perplexity["moe_random_router"]
    assert report["routing"]["block_max_rel_error"] <= 2 * Derivation().routing_spread
    request = _chat_request(directory, new_tokens=8)
    hf_model = AutoModelForCausalLM.from_pretrained(directory).eval()
    diff = compare_with_transformers(run_one_rank(directory, request), hf_model, request)
    print(f"smollm2-moe: max abs logit diff ours vs transformers {diff:.2e}")
    assert diff <= ATOL
