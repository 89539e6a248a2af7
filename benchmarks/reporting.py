"""Tables, the machine they were measured on, and the generated sections of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Inside the block torch uses ``count`` CPU threads (0: leave torch's setting), and its own setting again after."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; the first column left-aligned, the rest right-aligned."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Optional[torch.device] = None) -> str:
    """One line naming the hardware and the versions that produced a table."""
    import lightning

    if device is not None and device.type == "cuda":
        hardware = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        hardware = f"CPU {_cpu_name()}, {cores} cores, {torch.get_num_threads()} torch threads"
    return (
        f"{hardware}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}"
    )


def command_line(module: str, argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces a run: ``python -m <module> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *map(shlex.quote, args)])


def write_section(name: str, body: str, doc: Path = DOC_PATH) -> None:
    """Replace the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` in ``doc``, or append it."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
