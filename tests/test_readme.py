"""The README's commands run as written (issue 20).

Every fenced ``bash`` block of README.md carries a mark on the line right before its fence:

* ``<!-- readme: run -->`` (optionally ``<!-- readme: run timeout=600 -->``): the block runs, as
  written, as one bash script (``-e -o pipefail``: the first failing line fails it) in a fresh
  scratch directory of its own (empty but for ``.venv``, linked to this interpreter's venv, so
  ``. .venv/bin/activate`` works as in the repository; the venv's bin is first on PATH too) with a
  timeout; a non-zero exit fails the test with the block's output.
* ``<!-- readme: skip (reason) -->``: the block is not run and the reason is printed (it needs a
  GPU, a placeholder checkpoint such as ./my-sdxl, a running Ray cluster, ...).

A block without a mark fails :func:`test_every_command_block_is_marked`, which runs in the
default suite, so every new README section has to choose. The blocks run under
``pytest -m readme`` (``make test-readme``; ``.ci/run`` calls it after ``make test``), with the
suite's per-session model cache (conftest: ``DISTGEN_CACHE``, unless already set), so the embedded
models are built, converted and derived as on a fresh machine; ``DISTGEN_README_ONLY=LINE,...``
runs only the blocks whose fences are on those lines.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND_FENCES = ("```bash", "```sh", "```shell", "```console")
MARK = re.compile(r"^<!--\s*readme:\s*(?P<kind>run|skip)\b\s*(?P<rest>.*?)\s*-->\s*$")
DEFAULT_TIMEOUT_S = 300.0
OUTPUT_TAIL = 4000


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    kind: str | None  # "run", "skip" or None (unmarked)
    reason: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def command_blocks(text: str) -> list[Block]:
    """The README's command blocks with their marks (the last non-blank line before the fence)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        if fence in COMMAND_FENCES:
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            block = Block(line=i + 1, code="\n".join(lines[i + 1:end]) + "\n", kind=None)
            match = MARK.match(previous)
            if match:
                block.kind = match["kind"]
                rest = match["rest"]
                if block.kind == "skip":
                    block.reason = rest.strip().removeprefix("(").removesuffix(")").strip()
                else:
                    timeout = re.search(r"timeout=(\d+)", rest)
                    block.timeout_s = float(timeout[1]) if timeout else DEFAULT_TIMEOUT_S
            blocks.append(block)
        i = end + 1
    return blocks


def test_every_command_block_is_marked():
    """Fast, in the default suite: a new README block must say whether it runs here."""
    blocks = command_blocks(README.read_text())
    assert blocks, "no command blocks found in README.md"
    unmarked = [b.name for b in blocks if b.kind is None]
    assert not unmarked, (f"command blocks without a '<!-- readme: run -->' or '<!-- readme: skip (reason) -->' "
                          f"line before the fence: {', '.join(unmarked)}")
    reasonless = [b.name for b in blocks if b.kind == "skip" and not b.reason]
    assert not reasonless, f"skipped blocks must say why: {', '.join(reasonless)}"


def _environment() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(Path(venv_bin).parent)
    env.pop("PYTHONPATH", None)  # the installed distgen, not this checkout's path tricks
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "RAY_ADDRESS"):
        env.pop(name, None)  # the blocks start their own ranks
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_group(pgid: int) -> None:
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)


def run_block(block: Block) -> tuple[str, str, float]:
    """(status, output tail, seconds) of one block run in a fresh scratch directory. Status: "ok",
    "exit N", "timeout", or "left processes" when the script exited 0 but something it started
    (a server, a rank) was still running 10 s later: the block must stop what it starts."""
    with tempfile.TemporaryDirectory(prefix="distgen-readme-") as scratch:
        # Nothing of the checkout is there: only `.venv`, linked, for the blocks' `. .venv/bin/activate`.
        os.symlink(sys.prefix, Path(scratch) / ".venv", target_is_directory=True)
        script = Path(scratch).parent / f"{Path(scratch).name}.sh"
        log = Path(scratch).parent / f"{Path(scratch).name}.log"
        script.write_text(block.code)
        started = time.monotonic()
        with open(log, "w") as out:
            # its own process group (session): a timeout stops every rank it started, and what is left
            # after it exits can be found
            proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", str(script)], cwd=scratch, env=_environment(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=block.timeout_s)
                status = "ok" if code == 0 else f"exit {code}"
            except subprocess.TimeoutExpired:
                status = "timeout"
        seconds = time.monotonic() - started
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
        if _group_alive(proc.pid):
            if status == "ok":
                status = "left processes"
            _stop_group(proc.pid)
        proc.wait()
        output = log.read_text(errors="replace")
        script.unlink()
        log.unlink()
        return status, output[-OUTPUT_TAIL:], seconds


@pytest.mark.readme
@pytest.mark.timeout(3600)
def test_runnable_blocks_run_as_written(capsys):
    blocks = command_blocks(README.read_text())
    assert all(b.kind is not None for b in blocks), "unmarked blocks: see test_every_command_block_is_marked"
    failures, ran, skipped = [], [], []
    started = time.monotonic()
    only = {int(n) for n in os.environ.get("DISTGEN_README_ONLY", "").split(",") if n.strip()}
    for block in blocks:
        if only and block.line not in only:  # development: DISTGEN_README_ONLY=37,65 runs those blocks
            continue
        if block.kind == "skip":
            skipped.append(block)
            with capsys.disabled():
                print(f"\nskip {block.name}: {block.reason}", flush=True)
            continue
        status, output, seconds = run_block(block)
        ran.append((block, seconds))
        with capsys.disabled():
            print(f"\nran  {block.name}: {status} in {seconds:.0f} s", flush=True)
        if status != "ok":
            what = {"timeout": f"timed out after {block.timeout_s:.0f} s",
                    "left processes": "exited 0 but left processes running (stopped now)"}.get(status, status)
            failures.append(f"{block.name} {what}:\n{block.code}--- output (tail) ---\n{output}")
    with capsys.disabled():
        print(f"\nREADME blocks: {len(ran)} ran ({sum(s for _, s in ran):.0f} s in all), {len(skipped)} skipped, "
              f"{time.monotonic() - started:.0f} s", flush=True)
        for block in skipped:
            print(f"  skipped {block.name}: {block.reason}")
    assert not failures, "\n\n".join(failures)
