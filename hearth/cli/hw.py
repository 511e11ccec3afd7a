"""`hearth hw`: what this machine has (CPU, SIMD, RAM, GPUs)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hearth.cli.table import print_table
from hearth.models.fit import gb
from hearth.models.hardware import detect


def cmd_hw(args: argparse.Namespace) -> int:
    hw = detect()
    if args.json:
        print(json.dumps(hw.to_dict(), indent=2))
        return 0
    rows = [["os", f"{hw.os} {hw.arch}"], ["cpu", hw.cpu_model], ["cores", f"{hw.cores} ({hw.threads} threads)"],
            ["simd", ", ".join(hw.simd) or "-"], ["ram", f"{gb(hw.ram_total)} total, {gb(hw.ram_available)} available"]]
    for i, g in enumerate(hw.gpus):
        kind = "unified" if g.unified else "VRAM"
        rows.append([f"gpu {i}", f"{g.vendor} {g.name}: {gb(g.memory_total)} {kind}, {gb(g.memory_free)} free"])
    rows += [["note", n] for n in hw.notes]
    print_table(["WHAT", "VALUE"], rows, max_col=100)
    return 0


def add_parser(sub: Any) -> None:
    """Register `hearth hw`."""
    p = sub.add_parser("hw", help="this machine's CPU, RAM and GPUs (for model fit)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_hw)
