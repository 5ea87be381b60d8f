"""Builds TensorRT plans from a bundle's ONNX files and keeps them in a cache keyed by all that makes two plans differ.

The key (see :func:`cache_key`) covers the ONNX bytes, the precision recipe, the profile shapes, the
builder flags, hardware and version compatibility, the TensorRT version, the CUDA major and the GPU,
so a changed model, option, driver stack or card is a miss and rebuilds (or says how). Each plan has
a JSON sidecar beside it recording how, where and for what it was built.

Precision differs by TensorRT major version. TensorRT 10 takes builder flags (``FP16``, ``INT8`` with
a Q/DQ model). TensorRT 11 builds strongly typed networks only: the precision lives in the ONNX file,
so fp16 needs ``<model>.fp16.onnx`` (made by an autocast step) and int8 ``<model>.int8.onnx`` (Q/DQ,
made by a quantization step), both beside the model.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.engines.base import CLASSIFIER_MAX_BATCH, DETECTOR_MAX_BATCH
from edge.engines.manifest import Bundle, ModelSpec, sha256_file
from edge.engines.plans import (
    SIDECAR_FORMAT,
    MachineInfo,
    PlanRecord,
    cache_key,
    plan_path_for,
    read_sidecar,
    resolve_cache_dir,
    sidecar_path,
    trt_major_of,
    write_sidecar,
)
from edge.engines.probe import GpuProbe, probe_gpu, require_gpu
from edge.engines.tensorrt import load_tensorrt, trt_logger, trt_major
from edge.errors import BackendUnavailableError, ConfigError, EngineError, PlanError
from edge.fileio import atomic_write
from edge.vocab import (
    AMPERE_PLUS,
    HARDWARE_COMPAT,
    ON_MISSING_PLAN,
    PRECISIONS,
    HardwareCompat,
    OnMissingPlan,
    PrecisionName,
)

if TYPE_CHECKING:
    from edge.config import EnginesConfig
    from edge.engines.tensorrt import TensorRTEngine

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = {"detector": DETECTOR_MAX_BATCH, "classifier": CLASSIFIER_MAX_BATCH}  # per model role
DEFAULT_WORKSPACE_GB = 4.0
FP16_SUFFIX = ".fp16.onnx"  # beside <model>.onnx: the autocast FP16 model TensorRT 11 needs for fp16
INT8_SUFFIX = ".int8.onnx"  # beside <model>.onnx: the Q/DQ model int8 needs
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# ---------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class BuildOptions:
    """How to build plans. ``max_batch=0`` and ``opt_batch=0`` mean "per model role".

    >>> BuildOptions().max_batch_for("detector"), BuildOptions().max_batch_for("classifier")
    (8, 64)
    >>> BuildOptions(max_batch=16).opt_batch_for("detector")
    8
    """

    precision: PrecisionName = "fp16"
    max_batch: int = 0  # profile maximum; 0 = detector 8, classifiers 64
    opt_batch: int = 0  # the batch TensorRT tunes for; 0 = max_batch // 2 (at least 1)
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    timing_cache: Path | None = None  # reused across builds: later builds of similar models go much faster
    hardware_compat: HardwareCompat = "none"  # "ampere+": one plan runs on any Ampere or newer GPU (a bit slower)
    version_compatible: bool = False  # the plan runs on later TensorRT versions of the same major

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise ConfigError(f"hardware_compat={self.hardware_compat!r} must be one of {', '.join(HARDWARE_COMPAT)}")
        for name in ("max_batch", "opt_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0 (0 = per model role)")
        if self.max_batch and self.opt_batch > self.max_batch:
            raise ConfigError(f"opt_batch={self.opt_batch} must not exceed max_batch={self.max_batch}")
        if not self.workspace_gb > 0:
            raise ConfigError(f"workspace_gb={self.workspace_gb} must be more than 0")

    def max_batch_for(self, role: str) -> int:
        return self.max_batch or DEFAULT_MAX_BATCH.get(role, DEFAULT_MAX_BATCH["classifier"])

    def opt_batch_for(self, role: str) -> int:
        largest = self.max_batch_for(role)
        opt = self.opt_batch or max(1, largest // 2)
        if opt > largest:
            raise ConfigError(f"opt_batch={opt} must not exceed the {role}'s max batch {largest}")
        return opt

    def profile_for(self, model: ModelSpec) -> dict[str, list[list[int]]]:
        """The one optimisation profile: ``{input: [min, opt, max]}``, each ``[B, size, size, 3]``."""
        s = model.size
        return {
            model.input_name: [
                [1, s, s, 3],
                [self.opt_batch_for(model.role), s, s, 3],
                [self.max_batch_for(model.role), s, s, 3],
            ]
        }


def build_options(
    engines: EnginesConfig, *, hardware_compat: HardwareCompat = "none", version_compatible: bool = False
) -> BuildOptions:
    """Options from the ``[engines]`` settings; the timing cache defaults to ``<plan_cache>/timing.cache``."""
    timing = (
        Path(engines.timing_cache).expanduser() if engines.timing_cache else (engines.plan_cache_dir / "timing.cache")
    )
    return BuildOptions(
        precision=engines.precision,
        max_batch=engines.max_batch,
        workspace_gb=engines.workspace_gb,
        timing_cache=timing,
        hardware_compat=hardware_compat,
        version_compatible=version_compatible,
    )


# ---------------------------------------------------------------------------------------------
# machines and keys


def machine_info(
    probe: GpuProbe | None = None, trt: Any | None = None, device: int = 0
) -> tuple[MachineInfo | None, str]:
    """This machine as plans see it, or None and the reason (no GPU, no TensorRT). Never raises for those."""
    found = probe if probe is not None else probe_gpu()
    if not found.ok:
        return None, f"no usable NVIDIA GPU: {found.reason}"
    try:
        module = load_tensorrt(trt, probe=found)
        return MachineInfo.from_probe(found, module, device), ""
    except BackendUnavailableError as exc:
        return None, str(exc)


@dataclass(frozen=True)
class PlanRecipe:
    """Which ONNX file is compiled, and with which network and builder flags, for one precision and TensorRT major."""

    precision: str
    trt_major: int
    onnx_path: Path
    onnx_sha256: str
    source: str  # "model", "fp16-onnx" or "int8-onnx"
    strongly_typed: bool
    set_flags: tuple[str, ...] = ()  # BuilderFlag names set
    cleared_flags: tuple[str, ...] = ()  # BuilderFlag names cleared (on by default)

    @property
    def name(self) -> str:
        """E.g. ``fp16/builder-flags/model`` (TensorRT 10) or ``fp16/strongly-typed/fp16-onnx`` (TensorRT 11)."""
        return f"{self.precision}/{'strongly-typed' if self.strongly_typed else 'builder-flags'}/{self.source}"

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """Flags for the key: set ones by name, cleared ones as ``-NAME``, the network's as ``network:NAME``."""
        network = ("network:STRONGLY_TYPED",) if self.strongly_typed else ()
        return tuple(sorted(self.set_flags)) + tuple(f"-{f}" for f in sorted(self.cleared_flags)) + network


def fp16_onnx_path(model: ModelSpec) -> Path:
    """``detector.onnx`` -> ``detector.fp16.onnx`` beside it."""
    return model.path.with_name(model.path.stem + FP16_SUFFIX)


def int8_onnx_path(model: ModelSpec) -> Path:
    """``detector.onnx`` -> ``detector.int8.onnx`` beside it."""
    return model.path.with_name(model.path.stem + INT8_SUFFIX)


def fp16_recipe_command(model: ModelSpec) -> str:
    """The offline step that makes the FP16 ONNX file TensorRT 11 needs for fp16."""
    return (
        f"python -m modelopt.onnx.autocast --onnx_path {shlex.quote(str(model.path))} "
        f"--output_path {shlex.quote(str(fp16_onnx_path(model)))}"
    )


def int8_recipe_command(model: ModelSpec) -> str:
    """The offline step that makes the Q/DQ ONNX file int8 needs (calibration tiles in calib.npy, uint8 NHWC)."""
    return (
        f"python -m modelopt.onnx.quantization --onnx_path {shlex.quote(str(model.path))} --quantize_mode int8 "
        f"--calibration_data calib.npy --output_path {shlex.quote(str(int8_onnx_path(model)))}"
    )


def has_qdq(path: Path) -> bool:
    """True when an ONNX file holds QuantizeLinear/DequantizeLinear nodes (explicit quantization)."""
    return _has_qdq_cached(str(path), *_stat_key(path))


@functools.lru_cache(maxsize=64)
def _has_qdq_cached(path: str, mtime_ns: int, size: int) -> bool:
    try:
        import onnx
    except ImportError:  # without onnx, the op names are plain strings inside the protobuf
        data = Path(path).read_bytes()
        return any(op.encode() in data for op in _QDQ_OPS)
    model = onnx.load(path, load_external_data=False)
    return any(node.op_type in _QDQ_OPS for node in model.graph.node)


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def _file_sha256(path: Path) -> str:
    return _sha256_cached(str(path), *_stat_key(path))


def plan_recipe(model: ModelSpec, options: BuildOptions, major: int) -> PlanRecipe:
    """Decide what to compile for ``options.precision`` on TensorRT ``major``; EngineError says what is missing.

    TensorRT 10: fp32 plain, fp16 via the FP16 flag, int8 via the INT8 flag on a Q/DQ model.
    TensorRT 11+: strongly typed only, so fp16 and int8 need their own ONNX files beside the model.
    fp32 clears TF32 so that "fp32" means fp32 everywhere (the reference for parity checks).
    """
    strongly = major >= 11
    if options.precision == "fp32":
        return PlanRecipe("fp32", major, model.path, model.sha256, "model", strongly, (), ("TF32",))
    if options.precision == "fp16":
        if not strongly:
            return PlanRecipe("fp16", major, model.path, model.sha256, "model", False, ("FP16",))
        path = fp16_onnx_path(model)
        if not path.is_file():
            raise EngineError(
                f"TensorRT {major} builds strongly typed networks only (no FP16 builder flag): fp16 for model "
                f"{model.name!r} needs an FP16 ONNX beside it, {path}, which does not exist. Make it once with "
                f"ModelOpt AutoCast: {fp16_recipe_command(model)} (keep the uint8 input and float outputs; or "
                "onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True)), "
                "then build again; or build with --precision fp32"
            )
        return PlanRecipe("fp16", major, path, _file_sha256(path), "fp16-onnx", True)
    # int8: explicit quantization only (calibrators are deprecated in 10 and gone in 11)
    candidates = [p for p in (int8_onnx_path(model), model.path) if p.is_file()]
    source = next((p for p in candidates if has_qdq(p)), None)
    if source is None:
        raise EngineError(
            f"int8 for model {model.name!r} needs a Q/DQ (explicitly quantized) ONNX, and neither "
            f"{int8_onnx_path(model)} nor {model.path} has QuantizeLinear/DequantizeLinear nodes; the TensorRT "
            "build does not calibrate. Make an INT8 bundle version first: mitosis-edge engines quantize --bundle "
            f"{model.path.parent} --calibration-slide SLIDE --target tensorrt --out NEWDIR (then build NEWDIR), "
            f"or quantize offline with ModelOpt: {int8_recipe_command(model)}; or build with --precision fp16"
        )
    label = "int8-onnx" if source != model.path else "model"
    sha = model.sha256 if source == model.path else _file_sha256(source)
    if strongly:
        return PlanRecipe("int8", major, source, sha, label, True)
    return PlanRecipe("int8", major, source, sha, label, False, ("INT8",))


def key_fields(model: ModelSpec, options: BuildOptions, recipe: PlanRecipe, machine: MachineInfo) -> dict[str, Any]:
    """The arguments of :func:`cache_key` for one model on one machine.

    A hardware-compatible (``ampere+``) plan runs on any Ampere or newer GPU, so its key names that
    class of GPUs instead of this card: one such plan then serves every card of the class.
    """
    portable = options.hardware_compat == AMPERE_PLUS
    return {
        "onnx_sha256": recipe.onnx_sha256,
        "precision_recipe": recipe.name,
        "profile_shapes": options.profile_for(model),
        "builder_flags": list(recipe.builder_flags),
        "hardware_compat": options.hardware_compat,
        "version_compatible": options.version_compatible,
        "tensorrt_version": machine.trt_version,
        "cuda_major": machine.cuda_major,
        "compute_capability": "8.0+" if portable else machine.compute_capability,
        "gpu_name": "any Ampere or newer" if portable else machine.gpu_name,
    }


# ---------------------------------------------------------------------------------------------
# plan records and the cache folder


def build_command(bundle: Bundle, options: BuildOptions, cache_dir: str | Path | None = None) -> str:
    """The exact ``mitosis-edge engines build`` command that builds the plans these options ask for.

    (``opt_batch`` has no flag: the command line always uses the default, half the max batch.)
    """
    args = [
        "mitosis-edge",
        "engines",
        "build",
        "--bundle",
        str(bundle.path),
        "--precision",
        options.precision,
        "--max-batch",
        str(options.max_batch),
    ]
    if options.workspace_gb != DEFAULT_WORKSPACE_GB:
        args += ["--workspace-gb", f"{options.workspace_gb:g}"]
    if options.timing_cache:
        args += ["--timing-cache", str(options.timing_cache)]
    if options.hardware_compat != "none":
        args += ["--hardware-compat", options.hardware_compat]
    if options.version_compatible:
        args.append("--version-compatible")
    if cache_dir is not None and resolve_cache_dir(cache_dir) != resolve_cache_dir(None):
        args += ["--plan-cache", str(cache_dir)]
    return shlex.join(args)


def find_plan(
    model: ModelSpec, bundle: Bundle, options: BuildOptions, cache_dir: str | Path | None, machine: MachineInfo
) -> PlanRecord | None:
    """The cached plan for this model, options and machine, or None (a missing or damaged plan is a miss)."""
    recipe = plan_recipe(model, options, trt_major_of(machine.trt_version))
    key = cache_key(**key_fields(model, options, recipe, machine))
    path = plan_path_for(cache_dir, bundle, model, key)
    sidecar = read_sidecar(sidecar_path(path))
    if sidecar is None or sidecar.get("key") != key or not path.is_file():
        return None
    if sidecar.get("plan_bytes") not in (None, path.stat().st_size):
        log.warning(
            "plan %s is %d bytes, its sidecar says %s: treating it as missing",
            path,
            path.stat().st_size,
            sidecar.get("plan_bytes"),
        )
        return None
    return PlanRecord(path, sidecar, key)


# ---------------------------------------------------------------------------------------------
# building


def build_plan(
    model: ModelSpec,
    bundle: Bundle,
    options: BuildOptions | None = None,
    cache_dir: str | Path | None = None,
    *,
    trt: Any | None = None,
    probe: GpuProbe | None = None,
    device: int = 0,
) -> PlanRecord:
    """Build one model's plan with a dynamic-batch profile and store it (plan + sidecar) in the cache."""
    options = options or BuildOptions()
    found = require_gpu(probe)
    trt = load_tensorrt(trt, need_builder=True, probe=found)
    machine = MachineInfo.from_probe(found, trt, device)
    recipe = plan_recipe(model, options, trt_major(trt))
    fields = key_fields(model, options, recipe, machine)
    key = cache_key(**fields)
    path = plan_path_for(cache_dir, bundle, model, key)
    logger, relay = trt_logger(trt)
    mark = relay.mark()
    log.info(
        "building TensorRT plan for %s/%s (%s, max batch %d) on %s",
        bundle.name,
        model.name,
        recipe.name,
        options.max_batch_for(model.role),
        machine.describe(),
    )
    started = time.perf_counter()

    builder = trt.Builder(logger)
    strongly_typed = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    network_flags = 1 << _enum_value(strongly_typed) if recipe.strongly_typed else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(recipe.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or relay.since(mark, "ERROR")
        raise EngineError(
            f"TensorRT {trt.__version__} could not parse {recipe.onnx_path} ({len(errors)} error(s)):\n"
            + "\n".join(f"  - {e}" for e in errors)
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    for flag in recipe.set_flags:
        config.set_flag(_builder_flag(trt, flag, recipe))
    for flag in recipe.cleared_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compat == AMPERE_PLUS:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in fields["profile_shapes"].items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if options.timing_cache is not None:
        _load_timing_cache(config, options.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        messages = relay.since(mark, "WARNING")
        raise EngineError(
            f"TensorRT {trt.__version__} failed to build {bundle.name}/{model.name} ({recipe.name}) from "
            f"{recipe.onnx_path}; builder log:\n" + ("\n".join(f"  {m}" for m in messages[-40:]) or "  (empty)")
        )
    data = bytes(memoryview(serialized))
    seconds = time.perf_counter() - started
    if options.timing_cache is not None:
        _save_timing_cache(config, options.timing_cache)

    sidecar = _sidecar(model, bundle, options, recipe, machine, fields, key, data, seconds, cache_dir)
    atomic_write(path, data)
    write_sidecar(path, sidecar)
    log.info("built %s in %.1f s (%.1f MB)", path, seconds, len(data) / 1e6)
    return PlanRecord(path, sidecar, key)


def _enum_value(member: Any) -> int:
    return int(getattr(member, "value", member))


def _builder_flag(trt: Any, name: str, recipe: PlanRecipe) -> Any:
    try:
        return getattr(trt.BuilderFlag, name)
    except AttributeError:  # TensorRT 11 removed the weak-typing flags; plan_recipe should not have asked
        raise EngineError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{name} (needed for {recipe.name}); "
            "TensorRT 11+ takes the precision from the ONNX file instead"
        ) from None


def _load_timing_cache(config: Any, path: Path) -> None:
    data = b""
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read timing cache %s, starting a new one: %s", path, exc)
    try:
        cache = config.create_timing_cache(data)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign cache only costs build time
        log.warning("timing cache %s is unusable (%s); starting a new one", path, exc)
        cache = None
    if cache is None:
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        log.warning("TensorRT refused timing cache %s (made on another GPU or version?); building without it", path)


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    try:
        atomic_write(path, bytes(memoryview(cache.serialize())))
    except OSError as exc:
        log.warning("cannot save timing cache %s: %s", path, exc)


def _sidecar(
    model: ModelSpec,
    bundle: Bundle,
    options: BuildOptions,
    recipe: PlanRecipe,
    machine: MachineInfo,
    fields: dict[str, Any],
    key: str,
    data: bytes,
    seconds: float,
    cache_dir: str | Path | None,
) -> dict[str, Any]:
    from edge import __version__

    return {
        "format": SIDECAR_FORMAT,
        "key": key,
        "key_fields": fields,
        "bundle": bundle.name,
        "bundle_version": bundle.version,
        "bundle_path": str(bundle.path),
        "model": model.name,
        "role": model.role,
        "onnx_path": str(recipe.onnx_path),
        "onnx_sha256": recipe.onnx_sha256,
        "precision": recipe.precision,
        "precision_recipe": recipe.name,
        "strongly_typed": recipe.strongly_typed,
        "builder_flags": list(recipe.builder_flags),
        "max_batch": options.max_batch_for(model.role),
        "opt_batch": options.opt_batch_for(model.role),
        "profile_shapes": fields["profile_shapes"],
        "workspace_gb": options.workspace_gb,
        "hardware_compat": options.hardware_compat,
        "version_compatible": options.version_compatible,
        "tensorrt_version": machine.trt_version,
        "gpu_name": machine.gpu_name,
        "compute_capability": machine.compute_capability,
        "cuda_major": machine.cuda_major,
        "build_seconds": round(seconds, 3),
        "built_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        "plan_bytes": len(data),
        "plan_sha256": hashlib.sha256(data).hexdigest(),
        "build_command": build_command(bundle, options, cache_dir),
    }


def build_bundle(
    bundle: Bundle,
    options: BuildOptions | None = None,
    cache_dir: str | Path | None = None,
    *,
    rebuild: bool = True,
    models: Sequence[str] = (),
    trt: Any | None = None,
    probe: GpuProbe | None = None,
    device: int = 0,
) -> list[PlanRecord]:
    """Build every model's plan (or those named in ``models``); ``rebuild=False`` keeps plans already cached."""
    options = options or BuildOptions()
    found = require_gpu(probe)
    trt = load_tensorrt(trt, need_builder=True, probe=found)
    chosen = [m for m in bundle.models if not models or m.name in models]
    unknown = set(models) - {m.name for m in bundle.models}
    if unknown:
        raise EngineError(
            f"bundle {bundle.name!r} has no model(s) {sorted(unknown)}; models: "
            f"{', '.join(m.name for m in bundle.models)}"
        )
    machine = MachineInfo.from_probe(found, trt, device)
    records = []
    for model in chosen:
        record = None if rebuild else find_plan(model, bundle, options, cache_dir, machine)
        records.append(record or build_plan(model, bundle, options, cache_dir, trt=trt, probe=found, device=device))
    return records


def ensure_plans(
    bundle: Bundle,
    options: BuildOptions | None = None,
    cache_dir: str | Path | None = None,
    *,
    on_missing: OnMissingPlan = "build",
    trt: Any | None = None,
    probe: GpuProbe | None = None,
    device: int = 0,
) -> list[PlanRecord]:
    """A plan for every model of the bundle on this machine: cached, else built ("build") or PlanError ("fail")."""
    if on_missing not in ON_MISSING_PLAN:
        raise ConfigError(f"on_missing={on_missing!r} must be 'build' or 'fail'")
    options = options or BuildOptions()
    found = require_gpu(probe)
    trt = load_tensorrt(trt, need_builder=on_missing == "build", probe=found)
    machine = MachineInfo.from_probe(found, trt, device)
    records = []
    for model in bundle.models:
        record = find_plan(model, bundle, options, cache_dir, machine)
        if record is None:
            if on_missing == "fail":
                raise PlanError(
                    f"no TensorRT plan for {bundle.name}/{model.name} ({options.precision}, max batch "
                    f"{options.max_batch_for(model.role)}) for {machine.describe()} in {resolve_cache_dir(cache_dir)}",
                    build_command(bundle, options, cache_dir),
                )
            record = build_plan(model, bundle, options, cache_dir, trt=trt, probe=found, device=device)
        records.append(record)
    return records


def open_tensorrt_plans(
    bundle: Bundle,
    options: BuildOptions | None = None,
    cache_dir: str | Path | None = None,
    *,
    on_missing: OnMissingPlan = "build",
    in_flight: int = 2,
    cuda_graphs: bool = False,
    device: int = 0,
    trt: Any | None = None,
    cudart: Any | None = None,
    probe: GpuProbe | None = None,
) -> dict[str, TensorRTEngine]:
    """One TensorRTEngine per model (name -> engine, detector first), plans found or built first.

    A cached plan that fails to load is a miss: with ``on_missing="build"`` it is rebuilt once.
    If any engine fails to open, those already open are closed.
    """
    from edge.engines.tensorrt import TensorRTEngine

    options = options or BuildOptions()
    found = require_gpu(probe)
    trt = load_tensorrt(trt, need_builder=on_missing == "build", probe=found)
    records = ensure_plans(bundle, options, cache_dir, on_missing=on_missing, trt=trt, probe=found, device=device)
    engines: dict[str, TensorRTEngine] = {}

    def open_one(record: PlanRecord) -> TensorRTEngine:
        return TensorRTEngine(
            record.plan_path,
            name=record.model,
            in_flight=in_flight,
            cuda_graphs=cuda_graphs,
            device=device,
            rebuild_command=build_command(bundle, options, cache_dir),
            trt=trt,
            cudart=cudart,
            probe=found,
        )

    try:
        for model, record in zip(bundle.models, records, strict=True):
            try:
                engines[model.name] = open_one(record)
            except PlanError as exc:
                if on_missing != "build":
                    raise
                log.warning("cached plan %s did not load (%s); rebuilding it", record.plan_path, exc.message)
                rebuilt = build_plan(model, bundle, options, cache_dir, trt=trt, probe=found, device=device)
                engines[model.name] = open_one(rebuilt)
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return engines
