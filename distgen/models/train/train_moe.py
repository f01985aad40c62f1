"""Train a small Qwen2-MoE language model from scratch, so that its routing is learned (issue 17 part 4).

    python -m distgen.models.train.train_moe --out DIR --seed 0 --steps 3000 --threads 1

**Text** (offline, shipped with every Python): the modules of the standard library (every ``.py``
under ``sysconfig``'s ``stdlib``, tests, site-packages and demos left out, in sorted module order):
Python source with its docstrings and comments, English technical prose across many topics (email,
asyncio, decimal, http, xml, ...) mixed with code, so experts have syntax and topics to specialise on.
A module whose name hashes into the last 5 % is held out for the perplexity report. The corpus depends
on the Python version; its size and SHA-256 are recorded in ``training.json``.

**Tokenizer**: byte-level BPE of ``--vocab`` tokens trained on the training text with the
``tokenizers`` library, saved as a ``PreTrainedTokenizerFast`` (``tokenizer.json``), with
``<|endoftext|>`` between documents.

**Model**: ``Qwen2MoeForCausalLM`` (routed experts + a gated shared expert, ``norm_topk_prob``),
hidden 128, 4 layers, 16 routed experts of 64 neurons, top-4, a shared expert of 256, tied
embeddings: about 2.4 M parameters. Trained with next-token cross-entropy on ``--context``-token
windows plus Qwen's router load-balancing loss (``router_aux_loss_coef`` 0.01: without it a router
collapses onto a few experts early and placement has nothing to balance), AdamW with warm-up and
cosine decay, seeded data order. Saved with ``save_pretrained`` in fp16 safetensors, the tokenizer
beside it, and ``training.json`` (arguments, corpus, loss curve, held-out perplexity of the trained
model and of the same model with its routers re-drawn at random, and the routers' load per layer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

from distgen.models.train.train_image import _log

EOS = "<|endoftext|>"
HELD_OUT_FRACTION = 0.05


# -------------------------------------------------------------------------------------------- text
def _module_files(root: Path) -> list[tuple[str, Path]]:
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in skip or p.startswith("test_") for p in parts):
            continue
        out.append((".".join(parts)[:-3].removesuffix(".__init__"), path))
    return out


def held_out(module: str) -> bool:
    return zlib.crc32(module.encode()) % 1000 >= 1000 * (1 - HELD_OUT_FRACTION)


def corpus(root: Path | None = None) -> tuple[list[str], list[str], dict]:
    """(training documents, held-out documents, a description): the stdlib's module sources, one per document."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, test = [], []
    modules = _module_files(root)
    for module, path in modules:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, ValueError):
            continue
        (test if held_out(module) else train).append(text)
    digest = hashlib.sha256("\x00".join(train + test).encode()).hexdigest()
    info = {"source": f"the Python {sys.version_info.major}.{sys.version_info.minor} standard library's modules "
                      "(source with its docstrings and comments; tests left out)",
            "modules": len(modules), "documents": len(train), "held_out_documents": len(test),
            "characters": sum(map(len, train)), "held_out_characters": sum(map(len, test)), "sha256": digest}
    return train, test, info


# --------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


# ------------------------------------------------------------------------------------------- model
def build_model(vocab: int, context: int, eos: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max(context, 512), rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, qkv_bias=False,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=256,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.01,
        output_router_logits=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    config.architectures = ["Qwen2MoeForCausalLM"]
    return Qwen2MoeForCausalLM(config)


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, context: int, windows: int = 64) -> float:
    model.eval()
    n = min(windows, (len(stream) - 1) // context)
    losses = []
    for i in range(0, n, 8):
        rows = torch.stack([stream[j * context:(j + 1) * context + 1] for j in range(i, min(n, i + 8))])
        out = model(input_ids=rows[:, :-1], labels=rows[:, :-1].clone(), output_router_logits=False)
        losses.append(float(out.loss) * len(rows))
    model.train()
    return float(math.exp(sum(losses) / n))


@torch.no_grad()
def router_loads(model, stream: torch.Tensor, context: int, windows: int = 32) -> list[list[float]]:
    """Per layer, the share of top-k choices each expert gets on ``windows`` held-out windows."""
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    rows = torch.stack([stream[j * context:(j + 1) * context] for j in range(min(windows, len(stream) // context))])
    out = model(input_ids=rows, output_router_logits=True)
    loads = []
    for logits in out.router_logits:
        chosen = logits.topk(k, dim=-1).indices.flatten()
        loads.append([round(float(c), 4) for c in torch.bincount(chosen, minlength=experts) / chosen.numel()])
    return loads


def _redraw_routers(model, seed: int) -> None:
    torch.manual_seed(seed)
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=float(layer.mlp.gate.weight.std()))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    texts, held, info = corpus()
    _log(f"[data] {info['documents']} modules ({info['characters'] / 1e6:.1f} M characters) for training, "
         f"{info['held_out_documents']} held out")
    tokenizer = train_tokenizer(texts, args.vocab)
    stream, held_stream = token_stream(tokenizer, texts), token_stream(tokenizer, held)
    info.update(tokens=len(stream), held_out_tokens=len(held_stream))
    _log(f"[data] tokenizer of {len(tokenizer)} tokens; {len(stream) / 1e6:.2f} M training tokens "
         f"({time.perf_counter() - started:.1f} s)")

    eos = tokenizer.convert_tokens_to_ids(EOS)
    model = build_model(len(tokenizer), args.context, eos)
    params = sum(p.numel() for p in model.parameters())
    _log(f"[model] Qwen2MoeForCausalLM, {params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed + 1)
    windows = (len(stream) - 1) // args.context
    curve, step_seconds = [], []
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.steps, args.lr)
        starts = torch.randint(0, windows, (args.batch,), generator=generator) * args.context
        rows = torch.stack([stream[s:s + args.context] for s in starts.tolist()])
        tick = time.perf_counter()
        out = model(input_ids=rows, labels=rows.clone())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_seconds.append(time.perf_counter() - tick)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            aux = out.aux_loss.item() if out.aux_loss is not None else 0.0
            curve.append({"step": step + 1, "loss": round(out.loss.item(), 5), "aux_loss": round(aux, 5)})
            mean = sum(step_seconds[-args.log_every:]) / len(step_seconds[-args.log_every:])
            _log(f"[moe] step {step + 1}/{args.steps} loss {out.loss.item():.4f} (aux {aux:.3f}; {mean:.3f} s/step, "
                 f"eta {mean * (args.steps - step - 1):.0f} s)")
    train_seconds = time.perf_counter() - t0

    trained_ppl = perplexity(model, held_stream, args.context)
    loads = router_loads(model, held_stream, args.context)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _redraw_routers(model, args.seed + 2)
    random_router_ppl = perplexity(model, held_stream, args.context)
    model.load_state_dict(state)
    _log(f"[eval] held-out perplexity {trained_ppl:.2f} (routers re-drawn at random: {random_router_ppl:.2f})")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # inference does not need them
    model.half().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = {"args": vars(args), "corpus": info, "parameters": params,
              "final_loss": curve[-1]["loss"] if curve else None, "loss_curve": curve,
              "train_seconds": round(train_seconds, 1), "mean_step_seconds": round(train_seconds / max(1, args.steps), 4),
              "held_out_perplexity": round(trained_ppl, 3), "random_router_perplexity": round(random_router_ppl, 3),
              "router_load_per_layer": loads, "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out_dir / "training.json").write_text(json.dumps(record, indent=1))
    _log(f"[save] {out_dir} ({sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6:.1f} MB) in "
         f"{time.perf_counter() - started:.0f} s")
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m distgen.models.train.train_moe", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="checkpoint directory to write")
    p.add_argument("--held-out-prompts", type=int, default=None, metavar="N",
                   help="instead of training: print N prompts from the held-out modules as JSON Lines (for "
                        "distgen generate text --prompts-file, e.g. to record routing on text never trained on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--context", type=int, default=128, help="tokens per window")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.held_out_prompts is None and args.out is None:
        p.error("--out is required (or --held-out-prompts N)")
    for name in ("steps", "batch", "context", "threads", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.vocab < 512:
        p.error(f"--vocab must be >= 512 (byte-level BPE starts from 256 bytes), got {args.vocab}")
    return args


def held_out_prompts(count: int, chars: int = 600) -> list[str]:
    """Up to ``count`` passages of ``chars`` characters, one per held-out module long enough (from its
    ``chars``-th character on: past the licence header most modules open with)."""
    _, held, _ = corpus()
    return [text[chars:2 * chars] for text in held if len(text) >= 2 * chars][:count]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.held_out_prompts is not None:
        for prompt in held_out_prompts(args.held_out_prompts):
            print(json.dumps(prompt))
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
