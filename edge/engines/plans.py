"""TensorRT plans as files: the machine a plan depends on, its cache key, its place in the cache and its sidecar.

What both the builder (:mod:`edge.engines.build`) and the runtime (:mod:`edge.engines.tensorrt`) need
to know about a plan, so neither imports the other. Pure apart from reading and writing sidecars;
nothing here imports TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.config import default_plan_cache
from edge.engines.manifest import Bundle, ModelSpec
from edge.engines.probe import GpuProbe
from edge.fileio import atomic_write
from edge.vocab import AMPERE_PLUS

log = logging.getLogger(__name__)

PLAN_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1

__all__ = [
    "PLAN_SUFFIX",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "MachineInfo",
    "PlanRecord",
    "cache_key",
    "list_plans",
    "plan_matches_machine",
    "plan_path_for",
    "read_sidecar",
    "resolve_cache_dir",
    "sidecar_path",
    "trt_major_of",
    "version_tuple",
    "write_sidecar",
]


@dataclass(frozen=True)
class MachineInfo:
    """The parts of a machine a plan depends on."""

    trt_version: str
    cuda_major: int
    gpu_name: str
    compute_capability: str  # "8.9"

    @classmethod
    def from_probe(cls, probe: GpuProbe, trt: Any, device: int = 0) -> MachineInfo:
        gpu = probe.device(device)
        return cls(
            trt_version=str(trt.__version__),
            cuda_major=probe.cuda_major or 0,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
        )

    def describe(self) -> str:
        return (
            f"{self.gpu_name} (compute {self.compute_capability}), TensorRT {self.trt_version}, CUDA {self.cuda_major}"
        )


def cache_key(
    *,
    onnx_sha256: str,
    precision_recipe: str,
    profile_shapes: Mapping[str, Sequence[Sequence[int]]],
    builder_flags: Iterable[str],
    hardware_compat: str,
    version_compatible: bool,
    tensorrt_version: str,
    cuda_major: int,
    compute_capability: str,
    gpu_name: str,
) -> str:
    """sha256 (hex) of a canonical JSON of everything that makes two plans differ. Pure.

    Builder flags are a set: their order does not change the key.

    >>> k = dict(onnx_sha256="ab", precision_recipe="fp16", profile_shapes={"x": [[1], [2], [4]]},
    ...          builder_flags=["FP16"], hardware_compat="none", version_compatible=False,
    ...          tensorrt_version="10.13.3", cuda_major=12, compute_capability="8.9", gpu_name="L4")
    >>> cache_key(**k) == cache_key(**{**k, "builder_flags": ("FP16",)})
    True
    >>> cache_key(**k) == cache_key(**{**k, "gpu_name": "L40S"})
    False
    """
    canonical = {
        "onnx_sha256": str(onnx_sha256).lower(),
        "precision_recipe": str(precision_recipe),
        "profile_shapes": {str(k): [[int(d) for d in shape] for shape in v] for k, v in profile_shapes.items()},
        "builder_flags": sorted({str(f) for f in builder_flags}),
        "hardware_compat": str(hardware_compat),
        "version_compatible": bool(version_compatible),
        "tensorrt_version": str(tensorrt_version),
        "cuda_major": int(cuda_major),
        "compute_capability": str(compute_capability),
        "gpu_name": str(gpu_name),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def plan_matches_machine(sidecar: Mapping[str, Any], machine: MachineInfo) -> tuple[bool, str]:
    """Whether a plan (by its sidecar) can run here; else False and every difference, in words."""
    problems: list[str] = []
    built_trt = str(sidecar.get("tensorrt_version", ""))
    if built_trt and built_trt != machine.trt_version:
        newer_same_major = built_trt.split(".", maxsplit=1)[0] == machine.trt_version.split(".")[0] and version_tuple(
            machine.trt_version
        ) >= version_tuple(built_trt)
        if not (sidecar.get("version_compatible") and newer_same_major):
            problems.append(f"TensorRT {built_trt} built it, this machine has TensorRT {machine.trt_version}")
    built_cuda = sidecar.get("cuda_major")
    if built_cuda not in (None, 0) and machine.cuda_major and int(built_cuda) != machine.cuda_major:
        problems.append(f"built with CUDA {built_cuda}, this machine has CUDA {machine.cuda_major}")
    built_cc = str(sidecar.get("compute_capability", ""))
    built_gpu = str(sidecar.get("gpu_name", ""))
    if sidecar.get("hardware_compat") == AMPERE_PLUS:
        if version_tuple(machine.compute_capability) < (8, 0):
            problems.append(
                f"built for Ampere or newer GPUs (compute 8.0+), this GPU is {machine.gpu_name} "
                f"(compute {machine.compute_capability})"
            )
    elif built_cc and built_cc != machine.compute_capability:
        problems.append(
            f"built for compute capability {built_cc} ({built_gpu}), this GPU is "
            f"{machine.gpu_name} (compute {machine.compute_capability})"
        )
    elif built_gpu and built_gpu != machine.gpu_name:
        problems.append(f"built on {built_gpu}, this GPU is {machine.gpu_name}")
    return (not problems, "; ".join(problems))


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True)
class PlanRecord:
    """A plan in the cache and its sidecar."""

    plan_path: Path
    sidecar: dict[str, Any] = field(compare=False)
    key: str

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(self.plan_path)

    @property
    def model(self) -> str:
        return str(self.sidecar.get("model", self.plan_path.stem))


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_plan_cache()).expanduser()


def plan_path_for(cache_dir: str | Path | None, bundle: Bundle, model: ModelSpec, key: str) -> Path:
    """``<cache_dir>/<bundle>/<model>-<key[:16]>.plan``."""
    return resolve_cache_dir(cache_dir) / bundle.name / f"{model.name}-{key[:16]}{PLAN_SUFFIX}"


def sidecar_path(plan_path: Path) -> Path:
    """``<cache>/<bundle>/<model>-<key16>.plan`` -> the ``.json`` sidecar beside it."""
    return plan_path.with_suffix(SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """A sidecar's JSON object, or None when there is none; a damaged one is logged and is None too.

    The one reader of sidecars: the cache lookup, ``engines plans`` and the TensorRT engine (which
    checks a plan against this machine) all read them here.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring unreadable plan sidecar %s: %s", path, exc)
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        log.warning("ignoring unreadable plan sidecar %s: %s", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring plan sidecar %s: not a JSON object", path)
        return None
    return data


def write_sidecar(plan_path: Path, sidecar: Mapping[str, Any]) -> None:
    """Write a plan's sidecar beside it (atomically: a crash leaves the old one or none)."""
    atomic_write(sidecar_path(plan_path), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())


def list_plans(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every plan sidecar in the cache (with ``plan_path`` and ``plan_present`` added), by bundle and model."""
    root = resolve_cache_dir(cache_dir)
    found = []
    for path in sorted(root.glob(f"*/*{SIDECAR_SUFFIX}")):
        sidecar = read_sidecar(path)
        if sidecar is None or "key" not in sidecar:
            continue
        plan = path.with_suffix(PLAN_SUFFIX)
        found.append({**sidecar, "plan_path": str(plan), "plan_present": plan.is_file()})
    return found


def trt_major_of(version: str) -> int:
    """The major of a TensorRT version string: ``"10.13.3.9"`` -> 10."""
    return version_tuple(version)[0]
