"""Text jobs from user options: the checkpoint, the prompts, the plan and expert placement,
all checked before any worker starts (tp against heads / KV heads / MLP columns, pp against the
layer count, --ladder-layers against the layer count, the prompt against the model's context).
"""

from __future__ import annotations

import os
import sys

from distgen.config import ConfigError, ParallelConfig
from distgen.workloads import resolve_nproc

LADDER_CAVEAT = (
    "Ladder Residual is a different function from the standard residual: converting the upper {k} layer(s) of a "
    "checkpoint trained with the standard wiring is a speed study only; the output quality needs a checkpoint "
    "trained (or retrained) with ladder_layers={k}."
)


def resolve_placement(args, config, parallel: ParallelConfig) -> dict:
    """--placement / --routing / --redundant-experts -> TextJob fields (checked before launch)."""
    from distgen.parallel.expert import moe_layers

    fields = {"redundant_experts": args.redundant_experts, "nodes": args.nodes,
              "rebalance_interval": args.rebalance_interval, "rebalance_window": args.rebalance_window,
              "record_routing": args.record_routing}
    placement = args.placement or ("eplb" if args.redundant_experts or args.routing else None)
    if config.moe is None or placement is None:
        if config.moe is None and args.routing:
            raise ConfigError(f"--routing {args.routing}: the model is dense ({config.architecture}); routing traces "
                              f"belong to MoE checkpoints")
        if args.placement is not None:
            fields["placement_policy"] = args.placement  # check_job names the dense model
            fields["placement"] = {}
        return fields
    from distgen.placement.policies import POLICIES, Placement, compute
    from distgen.placement.routing import RoutingTrace

    ep = parallel.degree("ep")
    layers = moe_layers(config)
    if ep == 1:
        raise ConfigError(f"--placement {placement}: placing experts needs expert parallelism (--parallel ep=N, N > 1)")
    trace = None
    if args.routing:
        trace = RoutingTrace.load(args.routing)
        trace.check_for(config.moe.num_experts, layers, f"--routing {args.routing}")
    if placement in POLICIES:
        result = compute(placement, trace, config.moe.num_experts, layers, ep, nodes=args.nodes,
                         redundant=args.redundant_experts, time_limit_s=args.time_limit,
                         source=f"--routing {args.routing}" if args.routing else "routing trace")
        if result.note:
            print(f"distgen: note: {result.note}", file=sys.stderr)
    elif placement.endswith(".json") or os.path.exists(placement):
        result = Placement.load(placement)
        result.check_for(config.moe.num_experts, layers, ep, placement)
        slots = len(next(iter(result.layers.values()))[0]) * ep
        fields["redundant_experts"] = slots - config.moe.num_experts
    else:
        raise ConfigError(f"--placement: unknown policy {placement!r}; allowed: {', '.join(POLICIES)}, "
                          f"or a placement .json file")
    return fields | {"placement": {int(k): v for k, v in result.layers.items()}, "placement_policy": result.policy}


def default_model_dir() -> str:
    from distgen.models import smollm2

    return str(smollm2.model_dir())


def resolve_model(model: str | None, default: str = "smollm2", preset: str | None = None) -> str:
    """--model: a checkpoint directory or an embedded name (smollm2, smollm2-moe, the bench Llamas);
    --preset: its alias (bench text); None: ``default``."""
    from distgen.models import presets

    return presets.resolve("text", model, default, preset).directory


def read_prompts_file(path: str) -> list[str]:
    """--prompts-file: one JSON string, or an object with a "prompt" string, per non-blank line."""
    import json

    if not os.path.isfile(path):
        raise ConfigError(f"--prompts-file {path}: no such file (JSON Lines: one JSON string per line)")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--prompts-file {path}:{number}: not JSON ({e.msg}); give one JSON string per line") from None
            if isinstance(item, dict):
                item = item.get("prompt")
            if not isinstance(item, str):
                raise ConfigError(f"--prompts-file {path}:{number}: expected a JSON string or {{\"prompt\": \"...\"}}")
            prompts.append(item)
    if not prompts:
        raise ConfigError(f"--prompts-file {path}: no prompts in it")
    return prompts


def encode_prompts(tokenizer, prompts: list[str], chat: str, system: str | None) -> list[list[int]]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise ConfigError("--chat on: this checkpoint's tokenizer has no chat template; use --chat off")
    encoded = []
    for prompt in prompts:
        if chat == "on" or (chat == "auto" and has_template):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        encoded.append(list(ids))
    return encoded


def prepare_text_job(args):
    """Validate and tokenize; returns (job, nproc, tokenizer, checkpoint)."""
    from distgen.models.checkpoint import load_tokenizer, open_checkpoint
    from distgen.runtime.text import TEXT_AXES, TextJob, TextRequest, check_job

    from distgen.models.tiny_llm import PRESETS as TOKENIZERLESS

    if getattr(args, "prompts_file", None):
        args.prompt = (args.prompt or []) + read_prompts_file(args.prompts_file)
    if getattr(args, "parallel", "") == "auto":
        from distgen.workloads import resolve_auto_parallel

        resolve_auto_parallel(args, "text", resolve_model(args.model), batch=len(args.prompt or [""]),
                              gen_len=args.max_new_tokens)
    parallel = ParallelConfig.parse(args.parallel, TEXT_AXES, "text")
    nproc = resolve_nproc(args, parallel)
    if args.model in TOKENIZERLESS and not os.path.exists(args.model):
        raise ConfigError(f"--model {args.model}: an embedded benchmark model without a tokenizer (`distgen bench "
                          f"text` feeds it token ids); to generate text use smollm2 (the default), smollm2-moe or "
                          f"a checkpoint directory with its tokenizer")
    model = resolve_model(args.model)
    checkpoint = open_checkpoint(model)
    tokenizer = load_tokenizer(checkpoint.directory)
    prompts = args.prompt or ["Explain tensor parallelism in one sentence."]
    if any(not p for p in prompts):
        raise ConfigError("--prompt must not be empty")
    prompt_ids = encode_prompts(tokenizer, prompts, args.chat, args.system)
    eos = set(checkpoint.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    request = TextRequest(
        prompt_ids=tuple(tuple(p) for p in prompt_ids),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_ids=() if args.ignore_eos else tuple(sorted(eos)),
        pad_token_id=int(pad),
    )
    moe = resolve_placement(args, checkpoint.config, parallel) if hasattr(args, "placement") else {}
    job = TextJob(requests=(request,), parallel=parallel, model=checkpoint.directory, dtype=args.dtype,
                  ladder_layers=args.ladder_layers, micro_batches=args.micro_batches, comm_timeout_s=args.comm_timeout,
                  **moe)
    check_job(job, checkpoint, nproc)
    return job, nproc, tokenizer, checkpoint


def ladder_note(job, checkpoint) -> str | None:
    k = job.ladder_layers
    if k is not None and k > checkpoint.config.ladder_layers:
        return LADDER_CAVEAT.format(k=k)
    return None
