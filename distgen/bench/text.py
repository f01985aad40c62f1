"""``distgen bench text``: one rank vs tensor parallelism with standard and Ladder wiring, in one run.

Random prompt ids, EOS ignored, greedy. The single-rank baseline runs in its own process; the
tp wirings run in one set of worker processes that load the model once and alternate between
them request by request (``TextJob.wirings``), so load drift on a shared machine hits every
wiring alike. Per batch size: one short warmup request per wiring, then ``--repeats`` measured
requests per wiring; each metric is the median over the repeats.

Reported per wiring and batch size (rank 0's view): prefill tokens/s, decode tokens/s, seconds
per decoding step, tp bytes sent per step (the all-reduces of the embedding and of every
sub-block, plus the logits all-gather) and seconds waiting on tp communication per step
(medians over decoding steps). ``no-comm`` skips every all-reduce: its output is wrong, but it
is the ceiling Ladder's overlap can approach; the summary gives, per batch size, the share of
all-reduce waiting that Ladder hides, its speedup over standard, and the fraction of the
standard -> no-comm gap it captures.
"""

from __future__ import annotations

import statistics
import time

import torch

from distgen.config import ConfigError, ParallelConfig, parse_choices
from distgen.runtime.text import WIRINGS


def _requests(batch_sizes: list[int], prompt_len: int, new_tokens: int, vocab: int, repeats: int):
    """Per batch size: a warmup request, then ``repeats`` measured ones (same prompts)."""
    from distgen.runtime.text import TextRequest

    generator = torch.Generator().manual_seed(0)
    requests = []
    for batch in batch_sizes:
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).tolist()
        prompts = tuple(tuple(row) for row in ids)
        requests.append(TextRequest(prompt_ids=prompts, max_new_tokens=min(4, new_tokens)))
        requests.extend(TextRequest(prompt_ids=prompts, max_new_tokens=new_tokens) for _ in range(repeats))
    return tuple(requests)


def _summarise(run: dict, batch: int, prompt_len: int) -> dict:
    decode_steps = run["step_tokens"][1:]
    decode_tokens = sum(decode_steps)
    n = max(1, len(decode_steps))
    entry = {
        "batch_size": batch,
        "prefill_tokens_per_s": batch * prompt_len / run["prefill_seconds"],
        "decode_tokens_per_s": decode_tokens / run["decode_seconds"] if decode_tokens else None,
        "seconds_per_decode_step": run["decode_seconds"] / n,
        "tp_bytes_sent_per_step": int(statistics.median(run["tp_bytes"][1:] or [0])),
        "tp_collectives_per_step": int(statistics.median(run["tp_collectives"][1:] or [0])),
        "tp_wait_seconds_per_step": statistics.median(run["tp_wait_seconds"][1:] or [0.0]),
    }
    if any(run["pp_bytes"]):
        entry["pp_bytes_sent_per_step"] = int(statistics.median(run["pp_bytes"][1:] or [0]))
        entry["pp_wait_seconds_per_step"] = statistics.median(run["pp_wait_seconds"][1:] or [0.0])
    return entry


def _median_entry(entries: list[dict]) -> dict:
    out = {}
    for key, value in entries[0].items():
        values = [e[key] for e in entries]
        if isinstance(value, float):
            out[key] = statistics.median(values)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = int(statistics.median(values))
        else:
            out[key] = value
    return out


def bench_text(args) -> dict:
    from distgen.launch import run_job as launch
    from distgen.workloads import resolve_nproc
    from distgen.workloads.text import LADDER_CAVEAT
    from distgen.models.checkpoint import open_checkpoint
    from distgen.runtime.text import TEXT_AXES, TextJob, check_job

    parallel = ParallelConfig.parse(args.parallel, TEXT_AXES, "text")
    nproc = resolve_nproc(args, parallel)
    wirings = parse_choices(args.compare, WIRINGS, "--compare", "wiring")
    try:
        batch_sizes = [int(b) for b in args.batch_size.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batch-size: expected a comma list of positive integers, got {args.batch_size!r}") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"--batch-size: expected a comma list of positive integers, got {args.batch_size!r}")
    for name in ("prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    from distgen.models import presets

    resolved = presets.resolve("text", args.model, "llama-bench", args.preset)
    checkpoint = open_checkpoint(resolved.directory)
    config = checkpoint.config
    repeats = args.repeats
    requests = _requests(batch_sizes, args.prompt_len, args.max_new_tokens, config.vocab_size, repeats)
    ladder_layers = args.ladder_layers if args.ladder_layers is not None else config.num_layers
    job = TextJob(requests=requests, parallel=parallel, model=checkpoint.directory, dtype=args.dtype,
                  ladder_layers=ladder_layers, micro_batches=args.micro_batches, wirings=wirings,
                  threads_per_rank=args.threads_per_rank, comm_timeout_s=args.comm_timeout)
    check_job(job, checkpoint, nproc)  # everything validated before the first launch
    single = job.replace(parallel=ParallelConfig({}), micro_batches=None, wirings=("standard",))
    launcher = args.launcher if args.launcher != "auto" else "spawn"
    per_batch = 1 + repeats  # requests per batch size

    def measure(job, ranks: int, how: str) -> tuple[float, dict[str, list[dict]]]:
        """wall seconds, and per wiring one entry per batch size (medians over the repeats)."""
        started = time.perf_counter()
        result = launch(job, ranks, how, args.timeout, args.ray_address, threads_per_rank=args.threads_per_rank)
        wall = time.perf_counter() - started
        results = result["results"]
        out = {}
        for w, wiring in enumerate(job.wirings):
            runs = results[w::len(job.wirings)]
            entries = []
            for i, batch in enumerate(batch_sizes):
                measured = runs[i * per_batch + 1:(i + 1) * per_batch]  # skip the warmup
                entry = _median_entry([_summarise(r, batch, args.prompt_len) for r in measured])
                entry["tokens"] = measured[-1]["tokens"]
                entries.append(entry)
            out[wiring] = entries
        return wall, out

    report: dict = {
        "workload": "text",
        "model": checkpoint.directory,
        "preset": resolved.name,
        "architecture": config.architecture,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "parallel": str(parallel),
        "nproc": nproc,
        "dtype": args.dtype,
        "threads_per_rank": args.threads_per_rank,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "repeats": repeats,
        "ladder_layers": ladder_layers,
        "note": ("Wirings alternate request by request in the same tp processes; metrics are medians over "
                 "repeats. tp_bytes_sent_per_step counts the embedding and sub-block all-reduces (2 (n-1)/n of "
                 "the payload each way, ring) and the logits all-gather; no-comm skips the all-reduces and keeps "
                 "the gather. " + LADDER_CAVEAT.format(k=ladder_layers)),
    }
    baseline = None
    if not args.no_baseline:
        wall, entries = measure(single, 1, "spawn")
        baseline = entries["standard"]
        report["baseline"] = {"nproc": 1, "wall_seconds": wall,
                              "batches": [{k: v for k, v in e.items() if k != "tokens"} for e in baseline]}
    wall, by_wiring = measure(job, nproc, launcher)
    report["wall_seconds"] = wall
    runs = {}
    for wiring, entries in by_wiring.items():
        for i, entry in enumerate(entries):
            tokens = entry.pop("tokens")
            if baseline is not None:
                base = baseline[i]
                if entry["decode_tokens_per_s"] and base["decode_tokens_per_s"]:
                    entry["decode_speedup_vs_1_rank"] = entry["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                entry["same_tokens_as_1_rank"] = tokens == base["tokens"]
        runs[wiring] = {"wiring": wiring, "communicate": wiring != "no-comm",
                        "ladder_layers": ladder_layers if wiring == "ladder" else 0, "batches": entries}
    report["runs"] = list(runs.values())
    if "standard" in runs and "ladder" in runs:
        summary = []
        for i, batch in enumerate(batch_sizes):
            std, lad = runs["standard"]["batches"][i], runs["ladder"]["batches"][i]
            item = {
                "batch_size": batch,
                "ladder_speedup_over_standard": std["seconds_per_decode_step"] / lad["seconds_per_decode_step"],
                "all_reduce_wait_hidden_fraction": (1 - lad["tp_wait_seconds_per_step"] / std["tp_wait_seconds_per_step"]
                                                    if std["tp_wait_seconds_per_step"] > 0 else None),
            }
            if "no-comm" in runs:
                ceiling = runs["no-comm"]["batches"][i]
                gap = std["seconds_per_decode_step"] - ceiling["seconds_per_decode_step"]
                item["no_comm_speedup_over_standard"] = std["seconds_per_decode_step"] / ceiling["seconds_per_decode_step"]
                item["fraction_of_no_comm_gap_captured"] = (
                    (std["seconds_per_decode_step"] - lad["seconds_per_decode_step"]) / gap if gap > 0 else None)
            summary.append(item)
        report["ladder_summary"] = summary
    return report
