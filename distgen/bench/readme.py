"""``make bench-readme``: run every benchmark the README quotes and write its measured tables.

Each benchmark runs as the README shows it (``OMP_NUM_THREADS=1 distgen bench ...``, one process
per command, one after another); its JSON is kept under ``--results`` and rendered as a Markdown
table between the README's markers::

    <!-- bench-readme: NAME -->
    ...generated...
    <!-- /bench-readme: NAME -->

with the command, the date, the machine (CPU model, cores) and its load average before and after.
``--quick`` runs every command at toy sizes (a few steps, tokens and frames) to check that the
whole pipeline works; its tables go to ``--quick-out`` (default ``bench-results/README.quick.md``),
never into the README. ``--only image,text`` runs a subset.

    python -m distgen.bench.readme [--readme README.md] [--results bench-results] [--quick] [--only ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.", "Explain photosynthesis to a child.",
           "Give me three tips for learning Python.", "What causes rain?", "Why is the sky blue?",
           "How do I make a cup of tea?", "Describe the water cycle.")


@dataclass
class Bench:
    name: str
    commands: Callable[[bool, Path], list[list[str]]]  # (quick, workdir) -> commands; the last prints the JSON
    render: Callable[[list[dict], bool], str]  # the JSON of every command that printed one -> Markdown
    shown: str  # the command as the README quotes it
    results: list[dict] = field(default_factory=list)


def _bench(args: list[str]) -> list[str]:
    return ["distgen", "bench", *args]


# --------------------------------------------------------------------------- the benchmarks
def _image_commands(quick: bool, _: Path) -> list[list[str]]:
    size = ["--steps", "3", "--warmup-steps", "1", "--height", "64", "--width", "64"] if quick else []
    return [_bench(["image", "--model", "dit-bench", "--nproc", "2", "--parallel", "patch=2",
                    "--patch-mode", "displaced,sync,naive,partial", *size])]


def _text_commands(quick: bool, _: Path) -> list[list[str]]:
    size = ["--model", "tiny", "--batch-size", "1,2", "--max-new-tokens", "4", "--prompt-len", "8",
            "--repeats", "1"] if quick else ["--batch-size", "1,8"]
    return [_bench(["text", "--nproc", "2", "--parallel", "tp=2", "--compare", "standard,ladder,no-comm", *size])]


def _moe_commands(quick: bool, _: Path) -> list[list[str]]:
    size = ["--batch-size", "2", "--max-new-tokens", "4", "--repeats", "1", "--time-limit", "2"] if quick else []
    return [_bench(["moe", "--nproc", "2", "--parallel", "ep=2", "--compare", "round-robin,eplb,tuner", *size])]


def _place_commands(quick: bool, work: Path) -> list[list[str]]:
    trace = str(work / "routing.npz")
    prompts = [a for p in PROMPTS[:2 if quick else 8] for a in ("--prompt", p)]
    limit = ["--time-limit", "2"] if quick else []
    tokens = "8" if quick else "64"
    return [
        ["distgen", "generate", "text", "--model", "smollm2-moe", "--record-routing", trace, *prompts,
         "--max-new-tokens", tokens, "--ignore-eos"],
        ["distgen", "place", "--model", "smollm2-moe", "--routing", trace, "--ranks", "8", "--policy", "all",
         "--redundant-experts", "8", *limit],
        ["distgen", "place", "--synthetic", "8,32,2", "--zipf", "1.2", "--correlation", "0", "--ranks", "8",
         "--policy", "all", "--redundant-experts", "8", *limit],
        ["distgen", "place", "--synthetic", "8,32,2", "--zipf", "1.0", "--correlation", "0.8", "--ranks", "8",
         "--policy", "all", "--redundant-experts", "8", *limit],
    ]


def _video_commands(quick: bool, _: Path) -> list[list[str]]:
    size = ["--model", "tiny-t2v", "--frames", "8", "--height", "64", "--width", "64", "--steps", "3",
            "--warmup-steps", "1"] if quick else ["--rounds", "2"]
    return [_bench(["video", "--nproc", "2", "--parallel", "clip=2", "--clip-mode", "dual-scope", *size])]


# --------------------------------------------------------------------------- rendering
def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n / 1e3:.1f} kB" if n >= 100 else f"{int(n)} B"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _render_image(results: list[dict], _: bool) -> str:
    report = results[-1]
    base = report["baseline"]
    rows = [["1 rank", f"{base['seconds_per_step']:.3f}", "1.00x", "-", "0", "0"]]
    for run in report["runs"]:
        exact = run["max_abs_diff_latents"] == 0.0
        rows.append([f"`{run['patch_mode']}`", f"{run['seconds_per_step']:.3f}", f"{run['speedup_vs_1_rank']:.2f}x",
                     "exact (max diff 0.0)" if exact else f"{run['psnr_image_db']:.1f} dB",
                     _mb(run["bytes_sent_per_rank_per_step"]), f"{run['wait_seconds_per_step']:.3f}"])
    return _table(["mode", "s/step", "speedup vs 1 rank", "PSNR image vs 1 rank", "bytes sent/rank/step",
                   "wait s/step"], rows)


def _render_text(results: list[dict], _: bool) -> str:
    report = results[-1]
    runs = {r["wiring"]: r["batches"] for r in report["runs"]}
    base = report["baseline"]["batches"]
    summary = report.get("ladder_summary", [])
    header = [f"decode, {report['parallel']}"] + [f"batch {b['batch_size']}" for b in base]
    rows = [["1 rank"] + [f"{b['decode_tokens_per_s']:.1f} tok/s" for b in base]]
    for wiring, label in (("standard", "standard"), ("ladder", "Ladder"), ("no-comm", "no-comm (ceiling)")):
        if wiring in runs:
            rows.append([label] + [f"{b['decode_tokens_per_s']:.1f} tok/s, {1000 * b['tp_wait_seconds_per_step']:.1f} ms "
                                   f"waiting per step" for b in runs[wiring]])
    if summary:
        def pct(x):
            return "-" if x is None else f"{100 * x:.0f} %"
        rows.append(["all-reduce wait Ladder hides"] + [pct(s["all_reduce_wait_hidden_fraction"]) for s in summary])
        rows.append(["Ladder over standard"] + [f"{s['ladder_speedup_over_standard']:.2f}x" for s in summary])
        if "fraction_of_no_comm_gap_captured" in summary[0]:
            rows.append(["share of the standard -> no-comm gap Ladder captures"]
                        + [pct(s["fraction_of_no_comm_gap_captured"]) for s in summary])
    return _table(header, rows)


def _render_moe(results: list[dict], _: bool) -> str:
    report = results[-1]
    base = report["baseline"]
    rows = [["1 rank", f"{base['seconds_per_decode_step']:.3f}", f"{base['prefill_seconds']:.2f}", "-", "-", "-", "-",
             "-", "-"]]
    for run in report["runs"]:
        spare = run["slots_per_rank"] * report["nproc"] - report["experts"]
        name = run["policy"] + (f" (+{spare} spare slots)" if spare else "")
        rows.append([name, f"{run['seconds_per_decode_step']:.3f}", f"{run['prefill_seconds']:.2f}",
                     _mb(run["ep_bytes_sent_per_decode_step"]), _mb(run["ep_bytes_sent_prefill"]),
                     f"{run['ep_wait_seconds_per_decode_step']:.3f}", f"{run['balancedness']:.3f}",
                     f"{run['cross_rank_fraction']:.3f}", "yes" if run.get("same_tokens_as_1_rank") else "no"])
    return _table([report["parallel"], "s / decode step", "prefill s", "expert bytes sent / decode step",
                   "prefill bytes sent", "wait s / step", "balancedness", "cross-rank fraction",
                   "tokens = 1 rank's"], rows)


def _render_place(results: list[dict], _: bool) -> str:
    labels = ("`smollm2-moe` recorded routing", "synthetic, Zipf 1.2, no correlation", "synthetic, Zipf 1.0, correlation 0.8")
    rows = []
    for label, report in zip(labels, results):
        policies = report["policies"]
        routing = report["routing"]
        what = f"{label} ({routing['tokens']} tokens, {routing['moe_layers']} layers, top-{routing['top_k']} of " \
               f"{routing['experts']})"
        rows.append([what + ": balancedness"] + [f"{policies[p]['balancedness']:.3f}" for p in
                                                 ("round-robin", "eplb", "tuner")]
                    + [f"{policies['tuner'].get('solver_seconds', 0):.1f} s"])
        cut = policies["tuner"].get("cross_rank_cut_vs_round_robin")
        rows.append(["same: cross-rank fraction (floor " + f"{routing['cross_rank_floor']:.3f}, most any placement cuts: "
                     + f"{100 * report.get('max_possible_cut_vs_round_robin', 0):.1f} %)"]
                    + [f"{policies[p]['cross_rank_fraction']:.3f}" for p in ("round-robin", "eplb")]
                    + [f"{policies['tuner']['cross_rank_fraction']:.3f}"
                       + (f" ({-100 * cut:+.1f} %)" if cut is not None else ""), ""])
    return _table(["trace (8 ranks, +1 spare slot per rank for every policy)", "round-robin", "eplb", "tuner",
                   "tuner solver"], rows)


def _render_video(results: list[dict], _: bool) -> str:
    report = results[-1]
    base = report["baseline"]
    naive = next((r for r in report["runs"] if r["variant"] == "naive"), None)
    rows = [["1 rank", f"{base['seconds_per_step']:.3f}", "1.00x", "0", "0", "", "-"]]
    for run in report["runs"]:
        if run["variant"].startswith("dual-scope exchanging"):
            continue
        over = "" if naive is None or run is naive else f"{100 * (run['seconds_per_step'] / naive['seconds_per_step'] - 1):+.1f} %"
        name = "`" + run["variant"].replace("+stale", " --stale-context") + "`"
        psnr = "exact" if run["max_abs_diff_latents"] <= 1e-4 else f"{run['psnr_frames_db']:.1f} dB"
        rows.append([name, f"{run['seconds_per_step']:.3f}", f"{run['speedup_vs_1_rank']:.2f}x",
                     _mb(sum(run["bytes_sent_per_rank_per_step"]) / len(run["bytes_sent_per_rank_per_step"])),
                     f"{run['wait_seconds_per_step']:.3f}", over, psnr])
    table = _table(["mode", "s/step", "speedup vs 1 rank", "bytes sent/rank/step", "wait s/step", "over naive",
                    "PSNR frames vs 1 rank"], rows)
    overhead = report.get("sync_overhead_table")
    if overhead:
        table += "\n\nVideo-Infinity's synchronisation-overhead table, same run:\n\n" + _table(
            ["exchanges", "s/step", "over no exchange"],
            [[r["step"], f"{r['seconds_per_step']:.3f}", f"{r['overhead_vs_no_exchange_pct']:+.1f} %"] for r in overhead])
    return table


BENCHES = {
    "image": Bench("image", _image_commands, _render_image,
                   "OMP_NUM_THREADS=1 distgen bench image --model dit-bench --nproc 2 --parallel patch=2 "
                   "--patch-mode displaced,sync,naive,partial"),
    "text": Bench("text", _text_commands, _render_text,
                  "OMP_NUM_THREADS=1 distgen bench text --nproc 2 --parallel tp=2 --batch-size 1,8 "
                  "--compare standard,ladder,no-comm"),
    "moe": Bench("moe", _moe_commands, _render_moe,
                 "OMP_NUM_THREADS=1 distgen bench moe --nproc 2 --parallel ep=2 --compare round-robin,eplb,tuner"),
    "place": Bench("place", _place_commands, _render_place,
                   "distgen generate text --model smollm2-moe --record-routing routing.npz (8 prompts x 64 tokens), then "
                   "distgen place --ranks 8 --policy all --redundant-experts 8 on it and on two synthetic traces "
                   "(--synthetic 8,32,2: --zipf 1.2 --correlation 0; --zipf 1.0 --correlation 0.8)"),
    "video": Bench("video", _video_commands, _render_video,
                   "OMP_NUM_THREADS=1 distgen bench video --nproc 2 --parallel clip=2 --clip-mode dual-scope --rounds 2"),
}


# --------------------------------------------------------------------------- running and writing
def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _load() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run_bench(bench: Bench, quick: bool, results_dir: Path, log) -> dict:
    """Run a benchmark's commands; keep each JSON; returns timing and load for the provenance line."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    before, started = _load(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"bench-readme-{bench.name}-") as work:
        bench.results = []
        commands = bench.commands(quick, Path(work))
        ran = "; ".join(shlex.join(c).replace(work + "/", "") for c in commands)
        for i, command in enumerate(commands):
            print(f"bench-readme: {shlex.join(command)}", file=log, flush=True)
            proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"bench-readme: {bench.name}: `{shlex.join(command)}` exited with {proc.returncode}")
            out = proc.stdout.strip()
            if out.startswith("{"):
                result = json.loads(out)
                bench.results.append(result)
                (results_dir / f"{bench.name}-{i}.json").write_text(json.dumps(result, indent=2))
    return {"seconds": time.monotonic() - started, "load_before": before, "load_after": _load(), "commands": ran,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def section(bench: Bench, info: dict, quick: bool) -> str:
    table = bench.render(bench.results, quick)
    shown = f"`OMP_NUM_THREADS=1 {info['commands']}`" if quick else f"`{bench.shown}`"
    note = (f"Measured by `make bench-readme` ({'QUICK, toy sizes: ' if quick else ''}{shown}) on "
            f"{info['date']}, {machine()}, load average (1/5/15 min) {info['load_before']} before and "
            f"{info['load_after']} after; {info['seconds']:.0f} s.")
    return f"{table}\n\n{note}"


def write_sections(text: str, sections: dict[str, str]) -> str:
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- bench-readme: {re.escape(name)} -->\n).*?(\n<!-- /bench-readme: {re.escape(name)} -->)",
                             re.S)
        if not pattern.search(text):
            raise SystemExit(f"bench-readme: no '<!-- bench-readme: {name} -->' ... '<!-- /bench-readme: {name} -->' "
                             f"markers in the README")
        text = pattern.sub(lambda m: m[1] + body + m[2], text, count=1)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distgen.bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--results", default="bench-results", help="directory for each benchmark's JSON")
    parser.add_argument("--quick", action="store_true", help="toy sizes; tables to --quick-out, not the README")
    parser.add_argument("--quick-out", default=None, help="default: RESULTS/README.quick.md")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown {unknown}; allowed: {', '.join(BENCHES)}")
    results_dir = Path(args.results) / ("quick" if args.quick else "full")
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sections = {}
    for name in names:
        info = run_bench(BENCHES[name], args.quick, results_dir, sys.stderr)
        sections[name] = section(BENCHES[name], info, args.quick)
        print(f"bench-readme: {name} done in {info['seconds']:.0f} s", file=sys.stderr, flush=True)
    readme = Path(args.readme)
    text = write_sections(readme.read_text(), sections)
    out = readme if not args.quick else Path(args.quick_out or Path(args.results) / "README.quick.md")
    out.write_text(text)
    print(f"bench-readme: wrote {', '.join(names)} into {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
