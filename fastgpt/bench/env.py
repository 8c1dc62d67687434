"""The facts every benchmark record carries: device, library versions, git sha, date."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

ENV_FIELDS = ("device", "gpu", "torch", "triton", "cuda", "cudnn", "transformers", "fastgpt_cuda_ext",
              "git_sha", "git_dirty", "date")


def package_version(package: str) -> str | None:
    """The installed version of distribution `package`, or None when it is not installed.

    The one version lookup of the package: `fastgpt info` (fastgpt/cli.py) uses it too.
    """
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def dist_version(*names: str) -> str:
    """The installed version of the first distribution found among `names`, else "not installed"."""
    for name in names:
        version = package_version(name)
        if version:
            return f"{name} {version}"
    return "not installed"


def git_sha(path: Path | None = None) -> tuple[str, bool | None]:
    """(commit sha, working tree dirty?) of the repository holding fastgpt, or ("unknown", None)."""
    where = path or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return sha or "unknown", bool(status.strip())


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (platform.processor() is often empty on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _cuda_ext() -> str:
    from fastgpt import _backends

    try:
        _backends.cuda_extension()
    except _backends.BackendUnavailableError:
        return "not built"
    return "built"


def environment(device: torch.device) -> dict:
    """The record header: device, versions, git sha (and whether the tree is dirty), UTC date."""
    sha, dirty = git_sha()
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    return {
        "device": device.type,
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "transformers": package_version("transformers"),
        "fastgpt_cuda_ext": _cuda_ext(),
        "git_sha": sha,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def optional_module(name: str):
    """(module, None) if `name` imports, else (None, why not). Candidates name their versions
    with dist_version."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising something else
        return None, f"{name} is not installed ({type(exc).__name__}: {exc})"
