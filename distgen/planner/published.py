"""The published measurements (``shared/data/published-parallel-inference.csv``) as cases the
cost model predicts: each row becomes the model, machine, layout and workload it describes, and
a function of the efficiency factors that predicts the row's value in its own unit.

Which sources fit and which validate is decided here, by source (:data:`FIT_SOURCES`); rows the
model cannot express are skipped with the reason (:func:`_skip_reason`). A row's domain for the
report: image-unet, image-dit, video (UNet and DiT), llm-tp, collective, moe (llm-moe and the
DeepEP all-to-all rows); attn-sp rows are not used yet.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from distgen.config import ConfigError
from distgen.planner import catalog
from distgen.planner.costs import Comm, Env, Layout, diffusion_cost, text_cost
from distgen.planner.factors import Factors
from distgen.planner.hardware import ACCELERATORS, LINKS
from distgen.planner.models import DiffusionDesc, LLMDesc, describe_denoiser, describe_llm

DATA_NAME = "published-parallel-inference.csv"

# Sources (substrings of the `source` column) whose rows fit the factors; every other used source validates.
FIT_SOURCES: dict[str, str] = {
    "distrifuser assets/teaser.jpg": "image-unet",
    "distrifuser assets/quality.jpg": "image-unet",
    "xdit_assets performance/pixart/A100-": "image-dit",
    "xdit_assets performance/pixart/L40-": "image-dit",
    "xdit_assets performance/pixart/hybrid-pixart-": "image-dit",
    "gpt-fast README 'Tensor Parallelism'": "llm-tp",
    "vllm-project/vllm PR #2192": "llm-tp",
    "NVIDIA/Megatron-LM PR #5596": "collective",
    "sgl-project/sglang PR #2904": "collective",
    "DeepEP docs/legacy.md (V1) low-latency": "moe",
}
REPORT_DOMAINS = ("image-unet", "image-dit", "video", "llm-tp", "collective", "moe")
_DOMAIN = {"image-unet": "image-unet", "image-dit": "image-dit", "video-unet": "video", "video-dit": "video",
           "llm-tp": "llm-tp", "collective": "collective", "llm-moe": "moe", "moe-a2a": "moe", "attn-sp": "attn-sp"}


def data_path(path: str | None = None) -> Path:
    """The CSV: ``path``, else $DISTGEN_PUBLISHED_DATA, else ``shared/data`` beside the repository."""
    candidates = [path] if path else []
    if os.environ.get("DISTGEN_PUBLISHED_DATA"):
        candidates.append(os.environ["DISTGEN_PUBLISHED_DATA"])
    root = Path(__file__).resolve().parents[2]
    candidates += [str(root / "shared" / "data" / DATA_NAME), str(root.parent / "shared" / "data" / DATA_NAME)]
    for c in candidates:
        p = Path(c)
        if p.is_dir():
            p = p / DATA_NAME
        if p.is_file():
            return p
    where = path or "shared/data/ beside the repository (or $DISTGEN_PUBLISHED_DATA)"
    raise ConfigError(f"--data: the published measurements ({DATA_NAME}) are not at {where}")


@dataclass
class Case:
    line: int  # line in the CSV (header = 1)
    row: dict
    domain: str
    split: str  # fit | validate | skip
    reason: str = ""  # why skipped; assumptions otherwise
    measured: float | None = None  # None: OOM
    higher_is_better: bool = False
    table: str | None = None  # comparison-table key (same model, workload, GPU count, machine)
    config: str = ""
    predict: Callable[[Factors], float | None] | None = None  # None when the plan is predicted infeasible
    assumptions: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.row["source"]

    @property
    def oom(self) -> bool:
        return self.row["value"].strip().upper() == "OOM"


def _value(text: str) -> float | None:
    text = text.strip()
    if text.upper() == "OOM":
        return None
    m = re.match(r"~?\s*([0-9.]+)", text)
    return float(m.group(1)) if m else None


def _hardware(text: str) -> str | None:
    t = text.lower()
    for key, name in (("h800", "h800"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("sm90", "h100"),
                      ("a100-80gb (chart", "a100-80gb"), ("a100-sxm4", "a100-80gb"), ("a100-80g", "a100-80gb"),
                      ("a100", "a100-80gb"), ("l40s", "l40s"), ("l40", "l40"), ("l20", "l20"), ("t4", "t4"),
                      ("rtx 4090", "rtx4090"), ("rtx 3090", "rtx3090"), ("rtx 6000 ada", "rtx6000-ada"),
                      ("rtx a5000", "rtx-a5000"), ("v100", "v100"), ("a30", "a30")):
        if key in t:
            return name
    return None


def _link(interconnect: str, hw: str) -> tuple[str, str]:
    """(link name, collective implementation) of an `interconnect` cell."""
    t = interconnect.lower()
    acc = ACCELERATORS[hw]
    if "p2p_disable" in t or "no nvlink p2p" in t:
        return "pcie5-host" if acc.pcie == "pcie5" else acc.pcie, "nccl"
    if "nvlink bridge" in t:
        return acc.nvlink or "nvlink-bridge4", "nccl"
    if "nvlink" in t or "nvswitch" in t:
        impl = "custom" if "intra_node_comm" in t else "nccl"
        return acc.nvlink or "nvlink3", impl
    if "rdma" in t or "ib" in t.split():
        return "ib-ndr", "nccl"
    if "pcie" in t:
        return acc.pcie, "nccl"
    return acc.nvlink or acc.pcie, "nccl"


def _size_bytes(text: str) -> float | None:
    m = re.search(r"([0-9.]+)\s*(KiB|MiB|GiB|MB|KB|GB|B)\b", text)
    if not m:
        return None
    unit = {"B": 1, "KB": 1e3, "KiB": 1024, "MB": 1 << 20, "MiB": 1 << 20, "GB": 1 << 30, "GiB": 1 << 30}[m.group(2)]
    return float(m.group(1)) * unit


@lru_cache(maxsize=None)
def _diffusion(model: str, height: int, width: int, frames: int) -> DiffusionDesc:
    return describe_denoiser(catalog.DENOISERS[model], height, width, frames, catalog.SD_VAE)


@lru_cache(maxsize=None)
def _llm(model: str) -> LLMDesc:
    return describe_llm(catalog.LLMS[model])


def _env(hw: str, link: str, factors: Factors) -> Env:
    return Env(ACCELERATORS[hw], LINKS[link], factors)


# ---------------------------------------------------------------------------- image / video rows
def _image_layout(config: str, n: int, source: str) -> tuple[Layout | None, str]:
    c = config.lower().replace(" ", "")
    if n == 1 or c.startswith(("original", "1gpu", "baseline")):
        return Layout(), ""
    if c.startswith("paradigms"):
        return None, "ParaDiGMS (parallel sampling) is not a strategy the planner models"
    if c.startswith("bestHybrid".lower()):
        return None, "the chart's 'best hybrid' line does not say which configuration it is"
    if c.startswith("distrifusion"):
        if "distrifuser" in source:  # distrifuser's default split_batch: the guidance halves on two groups
            return Layout(cfg=2, patch=n // 2, patch_mode="displaced") if n > 2 else Layout(cfg=2), ""
        return Layout(patch=n, patch_mode="displaced"), ""
    if c.startswith("naive_patch"):
        return Layout(patch=n, patch_mode="naive"), ""
    if c.startswith("tensor_parallel"):
        return Layout(dit_tp=n), ""
    degrees = dict((k, int(v)) for k, v in re.findall(r"(cfg|pipefusion|ulysses|ring)=(\d+)", c))
    if c.startswith("pipefusion") and "pipefusion" not in degrees:
        degrees["pipefusion"] = n // degrees.get("cfg", 1)
    cfg = degrees.get("cfg", 1)
    if "pipefusion" in degrees:
        warm = re.search(r"warmup=(\d+)", c)
        return Layout(cfg=cfg, pipefusion=degrees["pipefusion"]), (f"warmup {warm.group(1)}" if warm else "")
    rest = n // cfg
    u, r = degrees.get("ulysses", 0), degrees.get("ring", 0)
    if "sic" in c:  # "ring=4(sic; 8 GPUs)": the chart's 8-GPU ring point
        u, r = 0, rest
    if u and r:
        r = rest // u
    if u and not r:
        r = rest // u
    if r and not u:
        u = rest // r
    if u <= 1 and r > 1:
        return Layout(cfg=cfg, sp=rest, sp_mode="ring"), ""
    if r <= 1 and u > 1:
        return Layout(cfg=cfg, sp=rest, sp_mode="ulysses"), ""
    if u > 1 and r > 1:
        return Layout(cfg=cfg, sp=u * r, sp_mode="usp", ulysses=u), ""
    if cfg > 1 and cfg == n:
        return Layout(cfg=cfg), ""
    return None, f"configuration {config!r} not understood"


def _image_case(case: Case) -> None:
    row = case.row
    model = "SDXL" if row["model"] == "SDXL" else "Latte" if row["model"] == "Latte" else \
        "PixArt-alpha" if row["model"].startswith("PixArt") else None
    if model is None:
        case.split, case.reason = "skip", f"model {row['model']} not in the planner's catalog"
        return
    w = row["workload"]
    m = re.match(r"\s*(\d+)(?:x(\d+))?(?:x(\d+)\s*frames)?", w)
    if not m:
        case.split, case.reason = "skip", "workload size not stated"
        return
    h = int(m.group(1))
    wd = int(m.group(2) or h)
    frames = int(m.group(3) or 1)
    if row["model"] != "Latte" and m.group(2):  # distrifuser writes width x height
        h, wd = int(m.group(2)), int(m.group(1))
    steps_m = re.search(r"(\d+)[- ]step", w)
    if steps_m:
        steps = int(steps_m.group(1))
    else:
        steps = 20
        case.assumptions.append("steps not stated: 20 assumed (xDiT's PixArt default)")
    hw = _hardware(row["hardware"])
    n = int(row["n_gpus"])
    layout, note = _image_layout(row["config"], n, row["source"])
    if layout is None:
        case.split, case.reason = "skip", note
        return
    if note:
        case.assumptions.append(note)
    warm = re.search(r"warmup=(\d+)", row["config"])
    link, impl = _link(row["interconnect"], hw)
    if "xdit" in row["source"] and layout.patch > 1:
        case.assumptions.append("xDiT's DistriFusion: patch over all ranks, no guidance split")
    desc = _diffusion(model, h, wd, frames)
    warmup_pf = int(warm.group(1)) if warm else 1

    def predict(factors: Factors, layout=layout, desc=desc, hw=hw, link=link, steps=steps) -> float | None:
        plan = diffusion_cost(desc, layout, _env(hw, link, factors), steps, guidance=True)
        if layout.pipefusion > 1 and warmup_pf != 1:  # one more synchronous step per extra warmup step
            plan.latency_s += (warmup_pf - 1) * (plan.warmup_step_s - plan.step_s)
        return plan.latency_s if plan.feasible else None

    case.predict = predict
    case.config = layout.label()
    case.table = "|".join((row["source"], row["model"], row["hardware"], row["interconnect"], row["n_gpus"],
                           row["workload"], row["metric"])) if n > 1 else None


# ---------------------------------------------------------------------------- text rows
_LLM_NAMES = (("Llama-3.1-70B", "Llama-3.1-70B"), ("Llama-3.1-8B", "Llama-3.1-8B"), ("Llama-2-70B", "Llama-2-70B"),
              ("Llama-2-7B", "Llama-2-7B"), ("Llama 70B", "Llama-2-70B"), ("Llama 33B", "Llama-33B"),
              ("Llama 13B", "Llama-2-13B"), ("Llama 7B", "Llama-2-7B"), ("Llama-style 1B", "Llama-3.2-1B"),
              ("Llama-style 3B", "Llama-3.2-3B"), ("Llama-style 8B", "Llama-3.1-8B"), ("Llama-style 70B", "Llama-3.1-70B"),
              ("Mixtral-8x7B", "Mixtral-8x7B"))


def _text_case(case: Case) -> None:
    row = case.row
    if "34B" in row["model"]:
        case.split, case.reason = "skip", "known source error: the 34B row repeats the 70B batch-16 numbers"
        return
    name = next((m for key, m in _LLM_NAMES if row["model"].startswith(key)), None)
    if name is None:
        case.split, case.reason = "skip", f"model {row['model']} not in the planner's catalog"
        return
    if "parallel-attn" in row["config"]:
        case.split, case.reason = "skip", "parallel-attention architecture not modelled"
        return
    w = row["workload"]
    batch = int(re.search(r"bs=?(\d+)", w).group(1)) if re.search(r"bs=?(\d+)", w) else 1
    prompt = int(re.search(r"(?:prompt|in) (\d+)", w).group(1)) if re.search(r"(?:prompt|in) (\d+)", w) else 5
    gen = int(re.search(r"(?:gen|out) (\d+)", w).group(1)) if re.search(r"(?:gen|out) (\d+)", w) else 200
    hw = _hardware(row["hardware"])
    n = int(row["n_gpus"])
    link, impl = _link(row["interconnect"], hw)
    if "gpt-fast" in row["source"] and "issue" not in row["source"]:
        impl = "custom"  # gpt-fast's TP runs with ENABLE_INTRA_NODE_COMM=1 (PyTorch's intra-node all-reduce)
        case.assumptions.append("gpt-fast TP: PyTorch intra-node (peer-memory) all-reduce")
    if "custom all-reduce" in row["config"]:
        impl = "custom"
    layout = Layout(tp=n, ladder="ladder" in row["config"], no_comm="no-comm" in row["config"], impl=impl)
    desc = _llm(name)
    metric = row["metric"]

    def predict(factors: Factors) -> float | None:
        plan = text_cost(desc, layout, _env(hw, link, factors), batch=batch, prompt=prompt, gen=gen)
        if not plan.feasible:
            return None
        if metric == "decode_throughput":
            return batch / plan.decode_step_s
        if metric == "throughput":
            return batch * gen / plan.latency_s
        return plan.latency_s

    case.predict = predict
    case.higher_is_better = "throughput" in metric
    case.config = layout.label() + (" no-comm" if layout.no_comm else "") + (f" impl={impl}" if n > 1 else "")
    if n > 1 and not layout.no_comm:
        case.table = "|".join((row["source"], row["model"], row["hardware"], row["interconnect"], row["n_gpus"],
                               w, metric))


# ---------------------------------------------------------------------------- collectives, all-to-all
def _collective_case(case: Case) -> None:
    row = case.row
    if "[unverified]" in row["n_gpus"] or not row["n_gpus"].isdigit():
        case.split, case.reason = "skip", "world size not stated"
        return
    hw = _hardware(row["hardware"]) or "h100"
    n = int(row["n_gpus"])
    link, _ = _link(row["interconnect"], hw)
    cfg = row["config"].lower()
    impl = "nccl" if (("nccl" in cfg and "symm" not in cfg) or "torch.distributed" in cfg) else "custom"
    size = _size_bytes(row["workload"])
    if size is None and "large" in row["workload"]:
        size = float(1 << 30)
        case.assumptions.append("size '>256 MB': 1 GiB taken")
    op = "all_gather" if "all_gather" in row["model"] else "reduce_scatter" if "reduce_scatter" in row["model"] \
        else "all_reduce"
    factor = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
    metric = row["metric"]

    def predict(factors: Factors) -> float:
        t = Comm(op, op, factor * size, 1, LINKS[link], "blocking", impl=impl, group=n).seconds(factors)
        if metric.startswith("busbw"):
            return 2 * (n - 1) / n * size / t / 1e9
        return t * 1e6

    case.predict = predict
    case.higher_is_better = metric.startswith("busbw")
    case.config = f"{op} {impl} n={n} {row['workload']}"


def _a2a_case(case: Case) -> None:
    row = case.row
    hw = _hardware(row["hardware"])
    if hw is None:
        case.split, case.reason = "skip", f"{row['hardware']} not in the hardware table"
        return
    n = int(row["n_gpus"])
    link, _ = _link(row["interconnect"], hw)
    w = row["workload"]
    tokens = int(re.search(r"(\d+)K?\s*tok", w).group(1)) * (1024 if re.search(r"\d+K\s*tok", w) else 1)
    hidden = int(re.search(r"hidden (\d+)", w).group(1))
    top_k = int(re.search(r"top-(\d+)\b(?! groups)", w.replace("top-4 groups", "")).group(1))
    combine = "combine" in row["model"] and "dispatch" not in row["model"]
    size = tokens * top_k * hidden * (2 if combine else 1)  # DeepEP's logical bytes: FP8 dispatch, BF16 combine
    case.assumptions.append("DeepEP's logical bytes (tokens x top-k x hidden x dtype) over one link")
    metric = row["metric"]

    def predict(factors: Factors) -> float:
        t = Comm("all-to-all", "all_to_all", size, 1, LINKS[link], "blocking", group=n).seconds(factors)
        return size / t / 1e9 if metric.endswith("_bw") else t * 1e6

    case.predict = predict
    case.higher_is_better = metric.endswith("_bw")
    case.config = f"{'combine' if combine else 'dispatch'} EP={n} {tokens} tokens"


# ---------------------------------------------------------------------------- all rows
def _skip_reason(row: dict) -> str:
    src, metric = row["source"], row["metric"]
    if row["domain"] == "attn-sp":
        return ("attention-only kernel benchmark, not used: its two A100 machines differ ~4x per GPU on "
                "compute-bound rows, so it cannot anchor a hardware factor")
    if "torch.compile" in metric:
        return "compiled timing: the image model is fitted and checked on eager runs"
    if "Video-Infinity" in row["model"]:
        return "steps and guidance of the Video-Infinity runs are not stated in the source as quoted"
    if "exllamav2" in src:
        return "4.5-bit quantised kernels (ExLlamaV2's own): not a dtype the planner models"
    if "ATOM" in src:
        return "MI355 and requests/s at concurrency 128 with DP attention: not modelled"
    if "SM100" in row["hardware"]:
        return "B200 (SM100) is not in the hardware table"
    if "prefill_throughput" in metric:
        return "prefill-only throughput of a quantised model"
    return ""


def load_cases(path: str | None = None) -> list[Case]:
    cases: list[Case] = []
    with open(data_path(path), newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            domain = _DOMAIN.get(row["domain"], row["domain"])
            split = next((s for key, d in FIT_SOURCES.items() if key in row["source"] for s in ("fit",)), "validate")
            case = Case(line, row, domain, split, measured=_value(row["value"]))
            reason = _skip_reason(row)
            if reason:
                case.split, case.reason = "skip", reason
                cases.append(case)
                continue
            if domain in ("image-unet", "image-dit", "video"):
                _image_case(case)
            elif domain == "llm-tp" or (domain == "moe" and row["domain"] == "llm-moe"):
                _text_case(case)
            elif domain == "collective":
                _collective_case(case)
            elif domain == "moe":
                _a2a_case(case)
            if case.split != "skip" and case.measured is None and not case.oom:
                case.split, case.reason = "skip", f"value {row['value']!r} is not a number"
            cases.append(case)
    _drop_duplicates(cases)
    return cases


def _drop_duplicates(cases: list[Case]) -> None:
    """A validation row that repeats a fitting row's measurement (same model, machine, GPU count, workload,
    configuration kind and value: the same run shown in two charts) is not validation: skipped."""
    fitted = {(c.row["model"], c.row["hardware"], c.row["n_gpus"], c.row["workload"], c.config, c.row["value"])
              for c in cases if c.split == "fit"}
    for c in cases:
        if c.split == "validate" and (c.row["model"], c.row["hardware"], c.row["n_gpus"], c.row["workload"], c.config,
                                      c.row["value"]) in fitted:
            c.split, c.reason = "skip", "repeats a fitting row's measurement (the same run in another chart)"
