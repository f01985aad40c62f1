"""Options and output shared by every workload's commands."""

from __future__ import annotations

import argparse
import json

from distgen.config import LAUNCHERS


def add_launch_arguments(parser: argparse.ArgumentParser, timeout_s: float = 1800.0) -> None:
    """How to start the ranks: the same options for every workload."""
    parser.add_argument("--nproc", type=int, default=None, help="ranks to start (default: product of --parallel degrees)")
    parser.add_argument("--launcher", default="auto", choices=LAUNCHERS, help="auto: torchrun if run under it, else spawn")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: the job's cluster or a local one)")
    parser.add_argument("--timeout", type=float, default=timeout_s, help="seconds before the whole job is stopped")
    parser.add_argument("--comm-timeout", type=float, default=300.0, help="seconds before a stuck collective fails")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


class StepProgress:
    """A tqdm bar over a request's steps, fed by the engine's progress events (rank 0's view)."""

    def __init__(self, desc: str, enabled: bool = True, unit: str = "step"):
        self.desc, self.enabled, self.unit = desc, enabled, unit
        self.bar = None

    def __call__(self, event) -> None:
        if not self.enabled or event[0] != "progress":
            return
        step, total = event[1], event[2]
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit)
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
