"""``distgen plan``: rank every parallel plan of a model on N GPUs by predicted latency.

``--validate`` prints the model's errors on the published measurements (JSON); ``--fit`` refits the
efficiency factors on the fitting split and rewrites ``distgen/planner/fitted.py``. Everything is
pure Python over JSON configs: no weights are loaded, no worker starts.
"""

from __future__ import annotations

import json


def register_plan(subparsers) -> None:
    p = subparsers.add_parser("plan", help="pick the parallel plan from a fitted cost model (ranked, or --json)")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", default=None,
                     help="diffusers pipeline or HF checkpoint directory, or an embedded model's name (tiny-sd, ...)")
    src.add_argument("--model-config", default=None, metavar="FILE",
                     help="a denoiser/transformer config.json or an LLM config.json alone (plan before downloading)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (ranks) to plan for")
    p.add_argument("--hardware", default=None, help="accelerator: h100, h200, a100-80gb, a100-40gb, l40s, l40, l20, "
                   "rtx4090, t4, cpu, ... (an unknown one lists them)")
    p.add_argument("--interconnect", default=None,
                   help="link between the GPUs of a node: nvlink, pcie (the accelerator's generation), nvlink3, "
                        "pcie5, ... (default: nvlink where the part has it, else pcie)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs span (equal GPUs per node)")
    p.add_argument("--inter-node", default=None, help="link between nodes: ib-ndr, ib-hdr, ethernet-100g, ...")
    p.add_argument("--workload", default=None, choices=("image", "video", "text"),
                   help="default: from the model (a denoiser plans images or video, an LLM text)")
    p.add_argument("--height", type=int, default=None, help="image / video: pixels (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="image / video: pixels (default: the height)")
    p.add_argument("--steps", type=int, default=20, help="image / video: denoising steps")
    p.add_argument("--frames", type=int, default=None, help="video: frames (default: the model's, else 16)")
    p.add_argument("--no-guidance", action="store_true", help="classifier-free guidance off (no cfg axis)")
    p.add_argument("--batch", type=int, default=1, help="text: sequences per request")
    p.add_argument("--prompt-len", type=int, default=128, help="text: prompt tokens per sequence")
    p.add_argument("--gen-len", type=int, default=128, help="text: new tokens per sequence")
    p.add_argument("--ladder-checkpoint", action="store_true",
                   help="text: the checkpoint is ladder-trained, so Ladder Residual plans may be chosen")
    p.add_argument("--exact", action="store_true", help="rank exact plans only (no stale or partial context)")
    p.add_argument("--include-unimplemented", action="store_true",
                   help="also rank strategies distgen cannot run yet (PipeFusion, DiT tensor parallelism, USP)")
    p.add_argument("--json", action="store_true", help="print one JSON object (documented in the README)")
    p.add_argument("--validate", action="store_true",
                   help="print the model's errors on the published measurements as JSON, then exit")
    p.add_argument("--fit", action="store_true",
                   help="refit the efficiency factors on the fitting split and rewrite distgen/planner/fitted.py")
    p.add_argument("--data", default=None, metavar="CSV",
                   help="the published measurements (default: shared/data/ beside the repository)")
    p.add_argument("--rows", action="store_true", help="--validate: include every row's prediction")
    p.set_defaults(handler=_plan)


def _plan(args) -> int:
    from distgen.config import ConfigError

    if args.validate or args.fit:
        return _validate(args)
    if args.gpus is None:
        raise ConfigError("--gpus N is required (the GPUs to plan for)")
    if args.hardware is None:
        raise ConfigError("--hardware is required (h100, a100-80gb, l40s, cpu, ...)")
    from distgen.planner import Request, format_table, plan

    request = Request(workload=args.workload or "", height=args.height, width=args.width, steps=args.steps,
                      frames=args.frames, guidance=not args.no_guidance, batch=args.batch,
                      prompt_len=args.prompt_len, gen_len=args.gen_len, ladder_checkpoint=args.ladder_checkpoint,
                      exact_only=args.exact)
    result = plan(args.model, args.model_config, args.gpus, args.hardware, args.interconnect, request,
                  nodes=args.nodes, inter_node=args.inter_node, unimplemented=args.include_unimplemented)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _validate(args) -> int:
    from distgen.planner import factors, fit
    from distgen.planner.published import load_cases

    cases = load_cases(args.data)
    if args.fit:
        fitted, log = fit.fit(cases)
        path = fit.write_fitted(fitted, log)
        print(json.dumps({"written": str(path), "stages": log}, indent=2))
        if not args.validate:
            return 0
    else:
        fitted = factors.load()
    report = fit.evaluate(cases, fitted)
    if not args.rows:
        report.pop("rows")
    print(json.dumps(report, indent=2))
    return 0
