"""Managed virtual environments, one per EP, and which interpreter runs an EP's worker.

The OpenVINO and CUDA builds of onnxruntime replace the CPU build, so they live
in their own venvs under `$ONNXOPT_HOME/envs/<ep>` (default
`~/.cache/onnxopt/envs/<ep>`), created by `onnxopt ep setup <ep>`. An EP's
interpreter is, in order: one the user names (`--ep-python EP=PATH` or
`ONNXOPT_EP_PYTHON_<EP>`), the managed venv, the current interpreter if its
onnxruntime has the provider. Otherwise the EP is unavailable, with a reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from onnxopt.errors import UserError
from onnxopt.paths import home
from onnxopt.verify.ep import EP_PROVIDERS, provider_name

EP_PACKAGES: dict[str, list[str]] = {
    "openvino": ["onnxruntime-openvino", "numpy"],
    "cuda": ["onnxruntime-gpu", "numpy"],
}
"""What `ep setup` installs per EP (the CPU EP uses the tool's own environment)."""

log = logging.getLogger(__name__)

MARKER = "onnxopt-env.json"
"""Written last by `ep setup`; a venv without it is incomplete and ignored."""

_PROBE = (
    "import json, sys, onnxruntime as o; "
    "print(json.dumps({'version': o.__version__, 'providers': o.get_available_providers(), "
    "'python': sys.version.split()[0]}))"
)


@dataclass
class EpInterpreter:
    """The interpreter chosen to run one EP, or why there is none."""

    ep: str
    python: str | None
    source: str  # "option", "env var", "managed venv", "current interpreter" or "none"
    available: bool
    reason: str = ""
    ort_version: str = ""
    providers: list[str] = field(default_factory=list)

    @property
    def executable(self) -> str:
        """`python` of an available interpreter, the only kind that starts workers."""
        assert self.python is not None, f"no interpreter runs {self.ep}: {self.reason}"
        return self.python


def env_dir(ep: str) -> Path:
    """Where the managed venv of `ep` lives (whether or not it exists)."""
    return home() / "envs" / ep.lower()


def venv_python(venv: Path) -> Path:
    """The interpreter inside a venv."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def managed_python(ep: str) -> Path | None:
    """The managed venv's interpreter for `ep` if `ep setup` completed, else None."""
    venv = env_dir(ep)
    py = venv_python(venv)
    return py if (venv / MARKER).is_file() and py.exists() else None


@cache
def probe(python: str, timeout: float = 120.0) -> dict:
    """Ask an interpreter for its onnxruntime version and providers; `{"error": ...}` on failure."""
    try:
        proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"cannot run {python}: {exc}"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{python} cannot import onnxruntime: {tail}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"{python} gave an unreadable answer: {proc.stdout[-200:]!r}"}


def gpu_absent_reason() -> str:
    """Why CUDA cannot work on this machine, or "" when an NVIDIA GPU seems present."""
    if Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi"):
        return ""
    return "no NVIDIA GPU on this machine (no /dev/nvidiactl, no nvidia-smi)"


def _setup_hint(ep: str) -> str:
    return f"run `onnxopt ep setup {ep}` or set ONNXOPT_EP_PYTHON_{ep.upper()}"


def resolve_interpreter(ep: str, python: str | None = None) -> EpInterpreter:
    """Choose the interpreter that runs `ep`'s worker; never raises for a missing EP."""
    ep = ep.lower()
    provider = provider_name(ep)
    candidates: list[tuple[str, str]] = []
    named = python or os.environ.get(f"ONNXOPT_EP_PYTHON_{ep.upper()}")
    if python:
        candidates.append((python, "option"))
    elif os.environ.get(f"ONNXOPT_EP_PYTHON_{ep.upper()}"):
        candidates.append((os.environ[f"ONNXOPT_EP_PYTHON_{ep.upper()}"], "env var"))
    else:
        managed = managed_python(ep) if ep in EP_PACKAGES else None
        if managed:
            candidates.append((str(managed), "managed venv"))
        candidates.append((sys.executable, "current interpreter"))
    reasons = []
    for py, source in candidates:
        info = probe(py)
        if "error" in info:
            reasons.append(f"{source}: {info['error']}")
            continue
        if provider not in info["providers"]:
            reasons.append(f"{source} ({py}) has onnxruntime {info['version']} without {provider}")
            continue
        return EpInterpreter(ep, py, source, True, "", info["version"], info["providers"])
    if ep == "cuda" and gpu_absent_reason():
        reasons.insert(0, gpu_absent_reason())
    if not named:
        reasons.append(_setup_hint(ep))
    return EpInterpreter(ep, None, "none", False, "; ".join(reasons))


def setup_env(ep: str, force: bool = False, packages: list[str] | None = None, base_python: str | None = None) -> Path:
    """Create the managed venv for `ep` and install its onnxruntime build; returns the venv.

    The venv is built under a temporary name and renamed when the install and a
    check that the provider is listed both succeeded, so a failed setup never
    leaves a half-built environment that later runs would pick up.
    """
    ep = ep.lower()
    if ep not in EP_PACKAGES:
        raise UserError(f"`ep setup` knows {', '.join(EP_PACKAGES)}; the CPU EP uses this environment")
    target = env_dir(ep)
    if managed_python(ep) and not force:
        print(f"{ep}: environment already set up at {target} (use --force to rebuild)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base = base_python or sys.executable
    try:
        _run([base, "-m", "venv", str(tmp)], f"create a venv at {tmp}")
        py = str(venv_python(tmp))
        _run([py, "-m", "pip", "install", "--upgrade", "pip"], "upgrade pip", check=False)
        pkgs = packages or EP_PACKAGES[ep]
        _run([py, "-m", "pip", "install", *pkgs], f"pip install {' '.join(pkgs)}")
        info = probe.__wrapped__(py)
        if "error" in info or provider_name(ep) not in info.get("providers", []):
            raise UserError(f"{ep}: installed {pkgs} but the provider is not listed: {info}")
        (tmp / MARKER).write_text(json.dumps({"ep": ep, "packages": pkgs, **info}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    probe.cache_clear()
    print(f"{ep}: onnxruntime {info['version']} with {provider_name(ep)} at {target}")
    if ep == "cuda" and gpu_absent_reason():
        log.warning("%s; CUDA validation will be skipped here", gpu_absent_reason())
    return target


def _run(cmd: list[str], what: str, check: bool = True) -> None:
    log.info("+ %s", " ".join(cmd))
    proc = subprocess.run(cmd)
    if check and proc.returncode != 0:
        raise UserError(f"could not {what} (exit {proc.returncode}); see the output above")


def add_ep_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `setup`, `list` and `remove` sub-commands to the `onnxopt ep` parser."""
    sub = parser.add_subparsers(dest="ep_command", required=True)
    setup = sub.add_parser("setup", help="create the managed venv with an EP's onnxruntime build")
    setup.add_argument("ep", choices=sorted(EP_PACKAGES))
    setup.add_argument("--force", action="store_true", help="rebuild an existing environment")
    setup.add_argument(
        "--package",
        action="append",
        metavar="SPEC",
        help="pip requirement to install instead of the defaults (repeatable), e.g. onnxruntime-openvino==1.24.1",
    )
    setup.add_argument("--base-python", help="interpreter that creates the venv (default: this one)")
    sub.add_parser("list", help="show which interpreter runs each EP, or why none can")
    remove = sub.add_parser("remove", help="delete a managed environment")
    remove.add_argument("ep", choices=sorted(EP_PACKAGES))


def run_ep_command(args: argparse.Namespace) -> int:
    """Run `onnxopt ep ...`; returns the exit code."""
    if args.ep_command == "setup":
        setup_env(args.ep, force=args.force, packages=args.package, base_python=args.base_python)
        return 0
    if args.ep_command == "remove":
        target = env_dir(args.ep)
        shutil.rmtree(target, ignore_errors=True)
        print(f"{args.ep}: removed {target}")
        return 0
    for ep in EP_PROVIDERS:
        it = resolve_interpreter(ep)
        if it.available:
            print(f"{ep:9s} available  onnxruntime {it.ort_version} via {it.source}: {it.python}")
        else:
            print(f"{ep:9s} unavailable  {it.reason}")
    return 0
