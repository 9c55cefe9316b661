"""Helpers shared by the benchmark scripts: machine description and data subsets."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from typing import Any

import numpy as np
import torch

from sisa.data.loaders import LabeledArrays
from sisa.evaluate.monolithic import usable_threads


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    return usable_threads(0)


def machine_info() -> dict[str, Any]:
    """Describe the machine and software the numbers come from."""
    import ray

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": str(torch.__version__),
        "torch_threads_default": torch.get_num_threads(),
        "ray": ray.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def head(data: LabeledArrays, n: int) -> LabeledArrays:
    """The first ``n`` samples of ``data`` (views; the store copies what it ingests)."""
    return LabeledArrays(data.x[:n], data.y[:n], data.ids[:n])


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
