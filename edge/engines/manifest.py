"""Engine bundles: ``engines/<name>/manifest.toml`` plus ONNX files, loaded and checked against each graph.

Loading reads the manifest, checks every field, hashes every ONNX file and compares each graph's
input and outputs with what the manifest promises. Every problem is collected and reported at once
in one ManifestError, naming file, tensor, expected and found. docs/engines.md documents the format.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from edge.engines.base import TensorSpec
from edge.errors import ConfigError, ManifestError

log = logging.getLogger(__name__)

Layout = Literal["NCHW", "NHWC"]
ChannelOrder = Literal["RGB", "BGR"]
DetectorFormat = Literal["yolo_raw", "yolov8", "boxes"]
ScoreKind = Literal["probabilities", "logits"]
ClassRule = Literal["candidate_score", "argmax"]

MANIFEST_NAME = "manifest.toml"
DEMO_BUNDLE = "demo"
BUNDLES_ENV = "MITOSIS_EDGE_BUNDLES"  # a folder holding bundles, searched before the installed ones
MIN_OPSET = 13
MAX_MODEL_BYTES = 2 << 30  # protobuf caps one ONNX file at 2 GiB; a bigger "model" is refused before it is read

_LAYOUTS = ("NCHW", "NHWC")
_ORDERS = ("RGB", "BGR")
_FORMATS = ("yolo_raw", "yolov8", "boxes")
_SCORES = ("probabilities", "logits")
_CLASS_RULES = ("candidate_score", "argmax")
_FLOAT_TYPES = ("float32", "float16")


@dataclass(frozen=True)
class Normalisation:
    """How the original float model wants pixels: ``(uint8 * scale - mean) / std`` per channel.

    ``mean`` and ``std`` are in the model's own channel order (B, G, R for a BGR model).

    The wrap step bakes this into the ONNX graph; the engine itself then takes uint8.

    >>> Normalisation().apply_to(255)
    (1.0, 1.0, 1.0)
    >>> Normalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).apply_to(0)
    (-1.0, -1.0, -1.0)
    """

    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def apply_to(self, value: float) -> tuple[float, float, float]:
        return tuple((value * self.scale - m) / s for m, s in zip(self.mean, self.std, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelSpec:
    """What every model in a bundle declares. Pixel fields describe the float model before wrapping."""

    name: str  # "detector" or the classifier's name
    role: Literal["detector", "classifier"]
    path: Path  # absolute path of the ONNX file
    sha256: str
    input_name: str
    size: int  # square input side, px
    mpp: float  # µm/px the model was trained at
    layout: Layout = "NCHW"
    channel_order: ChannelOrder = "RGB"
    normalisation: Normalisation = field(default_factory=Normalisation)

    @property
    def input_spec(self) -> TensorSpec:
        """The input the bundle's ONNX file must take: uint8 NHWC RGB with a dynamic batch."""
        return TensorSpec(self.input_name, "uint8", (None, self.size, self.size, 3))

    @property
    def output_names(self) -> tuple[str, ...]:
        raise NotImplementedError


@dataclass(frozen=True)
class DetectorSpec(ModelSpec):
    """The candidate detector. Output formats (coordinates in input pixels):

    - ``yolo_raw``: ``[B, N, 5+C]`` rows of cx, cy, w, h, objectness, C class scores (YOLOv5/YOLOR export)
    - ``yolov8``:   ``[B, 4+C, N]`` columns of cx, cy, w, h, C class scores (no objectness)
    - ``boxes``:    ``[B, K, 6]``   rows of x1, y1, x2, y2, score, class after NMS (padding rows score 0)
    """

    output: str = "output"
    output_format: DetectorFormat = "yolo_raw"
    classes: tuple[str, ...] = ("mitotic_figure",)
    candidate_classes: tuple[str, ...] = ("mitotic_figure",)  # classes that propose MF candidates
    # candidate_score: a row's score is its best candidate-class score; argmax: its best class must be a candidate
    class_rule: ClassRule = "candidate_score"
    scores: ScoreKind = "probabilities"
    score_threshold: float = 0.25
    nms_iou: float = 0.45
    max_detections: int = 300  # per tile, after NMS
    merge_radius_um: float = 5.0  # one figure seen by two overlapping tiles counts once within this radius

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.output,)

    @property
    def candidate_indices(self) -> tuple[int, ...]:
        return tuple(self.classes.index(c) for c in self.candidate_classes)


@dataclass(frozen=True)
class HeadSpec:
    """One classifier head: an output tensor, and which column holds the positive class.

    ``[B]`` or ``[B,1]``: one score (sigmoid if logits). ``[B,K]``: column ``index`` (softmax if logits).
    """

    output: str
    index: int | None = None
    scores: ScoreKind = "logits"


@dataclass(frozen=True)
class ClassifierSpec(ModelSpec):
    """One member of the classifier ensemble: a mitotic-figure (MF) head, an atypical head, or both.

    An atypical-only member (the paper's subtyping network) never votes on MF and has weight 0.
    """

    weight: float = 1.0  # MF ensemble weight; 0 for a member without an MF head
    mitotic: HeadSpec | None = field(default_factory=lambda: HeadSpec("mitotic"))
    atypical: HeadSpec | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        heads = [h.output for h in (self.mitotic, self.atypical) if h is not None]
        return tuple(dict.fromkeys(heads))

    @property
    def votes_on_mitotic(self) -> bool:
        """True when this member's MF head counts in the ensemble (it has one, with a positive weight)."""
        return self.mitotic is not None and self.weight > 0


@dataclass(frozen=True)
class DecisionSpec:
    """How scores become decisions (the paper's values are the defaults)."""

    mitotic_threshold: float = 0.5  # ensemble mean p(MF) at or above this keeps a candidate as an MF
    atypical_above: float = 0.9  # p(atypical) above this: atypical
    normal_below: float = 0.1  # p(atypical) below this: normal; between the two: uncertain subtype
    atypical_heads: tuple[str, ...] = ()  # classifiers whose atypical heads are averaged; () = all that have one
    hotspot_area_mm2: float = 2.0


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked engine bundle."""

    path: Path  # the bundle folder
    name: str
    version: str
    intended_use: str
    detector: DetectorSpec
    classifiers: tuple[ClassifierSpec, ...]
    decision: DecisionSpec
    manifest_sha256: str
    description: str = ""
    model_card: Path | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return (self.detector, *self.classifiers)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models)
        raise KeyError(f"bundle {self.name!r} has no model {name!r}; models: {known}")

    @property
    def atypical_classifiers(self) -> tuple[ClassifierSpec, ...]:
        """The subtypers: members whose atypical head is in use (``decision.atypical_heads``, or all)."""
        chosen = self.decision.atypical_heads
        return tuple(c for c in self.classifiers if c.atypical and (not chosen or c.name in chosen))

    @property
    def mitotic_voters(self) -> tuple[ClassifierSpec, ...]:
        """Members whose MF head votes in the ensemble (MF head and weight > 0); they run on every candidate."""
        return tuple(c for c in self.classifiers if c.votes_on_mitotic)

    @property
    def subtype_only(self) -> tuple[ClassifierSpec, ...]:
        """Subtypers that do not vote on MF: they run only on candidates that passed the MF threshold."""
        return tuple(c for c in self.atypical_classifiers if not c.votes_on_mitotic)

    @property
    def unused_classifiers(self) -> tuple[ClassifierSpec, ...]:
        """Members that are never run: MF weight 0 (or no MF head) and no atypical head in use."""
        subtypers = {c.name for c in self.atypical_classifiers}
        return tuple(c for c in self.classifiers if not c.votes_on_mitotic and c.name not in subtypers)

    def ensemble_roles(self) -> dict[str, Any]:
        """Which members voted on MF (with their weights), which subtyped, and which were not run (provenance)."""
        return {
            "mitotic_voters": {c.name: c.weight for c in self.mitotic_voters},
            "subtypers": [c.name for c in self.atypical_classifiers],
            "subtype_only": [c.name for c in self.subtype_only],
            "not_run": [c.name for c in self.unused_classifiers],
        }


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# finding bundles


def bundle_search_path() -> list[Path]:
    """Folders that hold bundles, in the order they are searched.

    ``$MITOSIS_EDGE_BUNDLES``, then the ``engines/`` folder of a source checkout, then the bundles
    installed with the package (``<prefix>/share/mitosis-edge/engines``).
    """
    paths: list[Path] = []
    if env := os.environ.get(BUNDLES_ENV):
        paths.append(Path(env))
    checkout = Path(__file__).resolve().parents[2] / "engines"
    if (checkout / DEMO_BUNDLE / MANIFEST_NAME).is_file():
        paths.append(checkout)
    paths.append(Path(sys.prefix) / "share" / "mitosis-edge" / "engines")
    return paths


def find_bundle(name_or_path: str | Path | None) -> Path:
    """A bundle folder from a path or a bare bundle name (``demo``); None or "" means the demo bundle."""
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = DEMO_BUNDLE
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file() and candidate.name == MANIFEST_NAME:
        return candidate.parent
    if (candidate / MANIFEST_NAME).is_file():
        return candidate
    if candidate.parent == Path(".") and not candidate.exists():
        for folder in bundle_search_path():
            if (folder / str(name_or_path) / MANIFEST_NAME).is_file():
                return folder / str(name_or_path)
    searched = ", ".join(str(p) for p in bundle_search_path())
    env = os.environ.get(BUNDLES_ENV)
    raise ManifestError(
        str(name_or_path),
        [
            f"bundle not found: no {MANIFEST_NAME} there; give a bundle folder or the name of an installed bundle."
            f" Folders searched: {searched} (${BUNDLES_ENV} is {repr(env) if env else 'not set'}; set it to the"
            " folder that holds your bundles)"
        ],
    )


def list_bundles(*, every_copy: bool = False) -> list[Path]:
    """Every bundle folder found on the search path (first one wins for a folder name, unless ``every_copy``)."""
    seen: dict[str, Path] = {}
    for folder in bundle_search_path():
        if folder.is_dir():
            for manifest in sorted(folder.glob(f"*/{MANIFEST_NAME}")):
                key = str(manifest.parent.resolve()) if every_copy else manifest.parent.name
                seen.setdefault(key, manifest.parent)
    return list(seen.values())


def duplicate_bundles(bundles: list[Bundle]) -> dict[Path, str]:
    """A problem per bundle folder whose name and version another (different) bundle also has.

    Results, provenance and the plan cache tell bundles apart by name and version, so two different
    bundles that share both are an error; the same bundle installed twice (same manifest) is not.
    """
    by_key: dict[tuple[str, str], list[Bundle]] = {}
    for b in bundles:
        by_key.setdefault((b.name, b.version), []).append(b)
    problems: dict[Path, str] = {}
    for (name, version), group in by_key.items():
        if len({b.manifest_sha256 for b in group}) > 1:
            paths = ", ".join(str(b.path) for b in group)
            for b in group:
                problems[b.path] = (
                    f"bundle {name} {version} is defined twice, differently: {paths}; give one of them a new"
                    " [bundle] name or version"
                )
    return problems


# ---------------------------------------------------------------------------------------------
# editing a manifest's text (comments and order kept)


def set_toml_key(block: str, key: str, value: str) -> str:
    r"""One TOML table's text with ``key = value`` set (replaced in place, else added under the header).

    >>> set_toml_key('[bundle]\nversion = "1"  # kept\n', "version", '"2"')
    '[bundle]\nversion = "2"  # kept\n'
    """
    pattern = re.compile(rf"(?m)^(\s*){re.escape(key)}\s*=\s*[^\n#]*?(\s*(#.*)?)$")
    if pattern.search(block):
        return pattern.sub(lambda m: f"{m.group(1)}{key} = {value}{m.group(2) or ''}", block, count=1)
    head, _, rest = block.partition("\n")
    return f"{head}\n{key} = {value}\n{rest}"


def manifest_tables(text: str) -> list[tuple[str, str | None, str]]:
    """The manifest text cut into tables: (header, the table's ``name`` or None, text); joined they give it back."""
    tables = []
    for block in re.split(r"(?m)^(?=\s*\[)", text):
        header = block.lstrip().split("\n", 1)[0].strip()
        name = re.search(r'(?m)^\s*name\s*=\s*"([^"]*)"', block)
        tables.append((header, name.group(1) if name else None, block))
    return tables


def new_bundle_folder(bundle: Bundle, out: str | Path, what: str) -> Path:
    """The resolved folder for a new bundle version made from ``bundle``: never the bundle, never a full folder."""
    target = Path(out).resolve()
    if target == bundle.path.resolve():
        raise ConfigError(f"--out {out} is the bundle itself; {what} writes a new bundle, never in place")
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    return target


@contextmanager
def writing_bundle_version(bundle: Bundle, target: Path, report_name: str) -> Iterator[Path]:
    """A ``<target>.partial`` copy of ``bundle`` (without its ``report_name`` and any ``*.partial``) for the
    block to change (models, manifest, report); when the block ends the copy must load as a bundle, and only
    then does it take ``target``'s name: a half-written bundle never stands under the final name."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(bundle.path, partial, ignore=shutil.ignore_patterns(report_name, "*.partial"))
    yield partial
    load_bundle(partial)  # the new manifest must be as valid as the old one
    if target.exists():
        target.rmdir()
    partial.rename(target)


def source_bundle_json(bundle: Bundle) -> dict[str, str]:
    """What a derived bundle's report records of the bundle it was made from."""
    return {"name": bundle.name, "version": bundle.version, "path": str(bundle.path),
            "manifest_sha256": bundle.manifest_sha256}


def set_model_sha256(manifest_path: Path, model: str, sha: str) -> None:
    """Write ``sha256`` of one model (``detector`` or a classifier name) into the manifest file."""
    out = []
    for header, name, block in manifest_tables(manifest_path.read_text(encoding="utf-8")):
        mine = (header == "[detector]" and model == "detector") or (header == "[[classifier]]" and name == model)
        out.append(set_toml_key(block, "sha256", f'"{sha}"') if mine else block)
    tmp = manifest_path.with_name(manifest_path.name + ".partial")
    tmp.write_text("".join(out), encoding="utf-8")
    tmp.replace(manifest_path)


# ---------------------------------------------------------------------------------------------
# loading


def load_bundle(name_or_path: str | Path | None = None, *, check_graphs: bool = True) -> Bundle:
    """Load a bundle and check it. Raises ManifestError listing every problem found.

    With ``check_graphs`` (the default) each ONNX file is hashed and its graph compared with the
    manifest; that needs the ``onnx`` package.
    """
    folder = find_bundle(name_or_path)
    manifest_path = folder / MANIFEST_NAME
    try:
        text = manifest_path.read_bytes()
        raw = tomllib.loads(text.decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(manifest_path, [f"cannot read the manifest: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(manifest_path, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    bundle = _parse(folder, raw, hashlib.sha256(text).hexdigest(), problems)
    if bundle is not None and check_graphs:
        for model in bundle.models:
            problems.extend(check_model_file(model))
    if problems or bundle is None:
        raise ManifestError(manifest_path, problems)
    return bundle


class _Fields:
    """Typed access to one TOML table that records problems instead of stopping at the first."""

    def __init__(self, where: str, table: Any, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        if not isinstance(table, dict):
            problems.append(f"[{where}] must be a table, got {table!r}")
            table = {}
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                self.problems.append(f"[{self.where}] {key} is missing")
            return default
        return self.table[key]

    def text(self, key: str, default: str = "", *, required: bool = False, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default, required)
        if not isinstance(value, str):
            self.problems.append(f"[{self.where}] {key}={value!r} must be a string")
            return default
        if choices and value not in choices:
            self.problems.append(f"[{self.where}] {key}={value!r} must be one of {', '.join(choices)}")
            return default
        return value

    def num(
        self,
        key: str,
        default: float,
        *,
        required: bool = False,
        lo: float | None = None,
        hi: float | None = None,
        integer: bool = False,
    ) -> float:
        value = self._get(key, default, required)
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
            self.problems.append(f"[{self.where}] {key}={value!r} must be {'an integer' if integer else 'a number'}")
            return default
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.problems.append(f"[{self.where}] {key}={value} must be in [{lo}, {hi}]")
            return default
        number: float = value  # checked above: an int (or a finite float unless integer)
        return number

    def texts(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, list(default), False)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problems.append(f"[{self.where}] {key}={value!r} must be a list of strings")
            return default
        return tuple(value)

    def triple(self, key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
        value = self._get(key, list(default), False)
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            self.problems.append(
                f"[{self.where}] {key}={value!r} must be a list of 3 numbers,"
                " one per channel in the model's channel_order"
            )
            return default
        return (float(value[0]), float(value[1]), float(value[2]))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.problems.append(f"[{self.where}] unknown field(s): {', '.join(unknown)} (see docs/engines.md)")


def _parse(folder: Path, raw: dict[str, Any], manifest_sha: str, problems: list[str]) -> Bundle | None:
    unknown = sorted(set(raw) - {"bundle", "detector", "classifier", "decision"})
    if unknown:
        problems.append(
            f"unknown table(s): {', '.join(unknown)}; known: [bundle], [detector], [[classifier]], [decision]"
        )
    b = _Fields("bundle", raw.get("bundle", {}), problems)
    name = b.text("name", required=True)
    version = b.text("version", required=True)
    intended_use = b.text("intended_use", required=True)
    description = b.text("description")
    card = b.text("model_card")
    b.finish()
    if "detector" not in raw:
        problems.append("[detector] is missing: a bundle needs one detector")
    detector = _parse_detector(folder, raw.get("detector", {}), problems)
    raw_classifiers = raw.get("classifier", [])
    if not isinstance(raw_classifiers, list) or not raw_classifiers:
        problems.append("[[classifier]] is missing: a bundle needs at least one classifier")
        raw_classifiers = []
    classifiers = tuple(_parse_classifier(folder, i, t, problems) for i, t in enumerate(raw_classifiers))
    names = [c.name for c in classifiers]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"[[classifier]] name {dup!r} is used twice; names must be unique")
    if "detector" in names:
        problems.append("[[classifier]] name 'detector' is reserved for the detector")
    decision = _parse_decision(raw.get("decision", {}), classifiers, problems)
    if problems:
        return None
    return Bundle(
        path=folder.resolve(),
        name=name,
        version=version,
        intended_use=intended_use,
        detector=detector,
        classifiers=classifiers,
        decision=decision,
        manifest_sha256=manifest_sha,
        description=description,
        model_card=(folder / card).resolve() if card else None,
    )


def _model_common(folder: Path, f: _Fields) -> dict[str, Any]:
    norm = f.table.get("normalisation", {})
    f.used.add("normalisation")
    n = _Fields(f"{f.where}.normalisation", norm, f.problems)
    normalisation = Normalisation(
        scale=n.num("scale", 1.0 / 255.0, lo=0.0),
        mean=n.triple("mean", (0.0, 0.0, 0.0)),
        std=n.triple("std", (1.0, 1.0, 1.0)),
    )
    if any(s == 0 for s in normalisation.std):
        f.problems.append(f"[{f.where}.normalisation] std={list(normalisation.std)} must not contain 0")
    n.finish()
    file = f.text("file", required=True)
    if file and not (folder / file).resolve().is_relative_to(folder.resolve()):
        f.problems.append(f"[{f.where}] file={file!r} points outside the bundle folder; model files must live in it")
        file = ""
    sha = f.text("sha256", required=True).lower()
    if sha and (len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha)):
        f.problems.append(f"[{f.where}] sha256={sha!r} must be 64 hex digits")
    return {
        "path": (folder / file).resolve() if file else folder,
        "sha256": sha,
        "input_name": f.text("input", required=True),
        "size": int(f.num("size", 0, required=True, lo=16, hi=16384, integer=True)),
        "mpp": float(f.num("mpp", 0.25, required=True, lo=0.01, hi=100.0)),
        "layout": f.text("layout", "NCHW", choices=_LAYOUTS),
        "channel_order": f.text("channel_order", "RGB", choices=_ORDERS),
        "normalisation": normalisation,
    }


def _parse_detector(folder: Path, table: Any, problems: list[str]) -> DetectorSpec:
    f = _Fields("detector", table, problems)
    common = _model_common(folder, f)
    classes = f.texts("classes", ("mitotic_figure",))
    candidates = f.texts("candidate_classes", classes)
    for c in candidates:
        if c not in classes:
            problems.append(f"[detector] candidate class {c!r} is not in classes {list(classes)}")
    spec = DetectorSpec(
        name="detector",
        role="detector",
        **common,
        output=f.text("output", required=True),
        output_format=cast(DetectorFormat, f.text("output_format", "yolo_raw", required=True, choices=_FORMATS)),
        classes=classes,
        candidate_classes=tuple(c for c in candidates if c in classes),
        class_rule=cast(ClassRule, f.text("class_rule", "candidate_score", choices=_CLASS_RULES)),
        scores=cast(ScoreKind, f.text("scores", "probabilities", choices=_SCORES)),
        score_threshold=float(f.num("score_threshold", 0.25, lo=0.0, hi=1.0)),
        nms_iou=float(f.num("nms_iou", 0.45, lo=0.0, hi=1.0)),
        max_detections=int(f.num("max_detections", 300, lo=1, integer=True)),
        merge_radius_um=float(f.num("merge_radius_um", 5.0, lo=0.0, hi=100.0)),
    )
    f.finish()
    return spec


def _head(f: _Fields, prefix: str, scores: ScoreKind, required: bool) -> HeadSpec | None:
    output = f.text(f"{prefix}_output", required=required)
    index = f.table.get(f"{prefix}_index")
    f.used.add(f"{prefix}_index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        f.problems.append(f"[{f.where}] {prefix}_index={index!r} must be a column number (0 or more)")
        index = None
    return HeadSpec(output, index, scores) if output else None


def _parse_classifier(folder: Path, i: int, table: Any, problems: list[str]) -> ClassifierSpec:
    label = table.get("name", str(i)) if isinstance(table, dict) else str(i)
    f = _Fields(f"classifier {label}", table, problems)
    name = f.text("name", f"classifier{i}", required=True)
    common = _model_common(folder, f)
    scores = cast(ScoreKind, f.text("scores", "logits", choices=_SCORES))
    mitotic = _head(f, "mitotic", scores, False)
    atypical = _head(f, "atypical", scores, False)
    if mitotic is None and atypical is None:
        problems.append(
            f"[classifier {label}] has no head: set mitotic_output (the MF head), atypical_output"
            " (the atypical-vs-normal head) or both"
        )
    weight = float(f.num("weight", 1.0 if mitotic else 0.0, lo=0.0))
    if mitotic is None and weight > 0:
        problems.append(
            f"[classifier {label}] weight={weight:g} but it has no mitotic_output: an atypical-only member never"
            " votes on MF; remove weight (or set it to 0)"
        )
    spec = ClassifierSpec(
        name=name, role="classifier", **common, weight=weight, mitotic=mitotic, atypical=atypical
    )
    f.finish()
    return spec


def _parse_decision(table: Any, classifiers: tuple[ClassifierSpec, ...], problems: list[str]) -> DecisionSpec:
    f = _Fields("decision", table, problems)
    spec = DecisionSpec(
        mitotic_threshold=float(f.num("mitotic_threshold", 0.5, lo=0.0, hi=1.0)),
        atypical_above=float(f.num("atypical_above", 0.9, lo=0.0, hi=1.0)),
        normal_below=float(f.num("normal_below", 0.1, lo=0.0, hi=1.0)),
        atypical_heads=f.texts("atypical_heads", ()),
        hotspot_area_mm2=float(f.num("hotspot_area_mm2", 2.0, lo=0.01, hi=100.0)),
    )
    f.finish()
    if spec.normal_below > spec.atypical_above:
        problems.append(
            f"[decision] normal_below={spec.normal_below} must not exceed atypical_above={spec.atypical_above}"
        )
    with_heads = {c.name for c in classifiers if c.atypical}
    for name in spec.atypical_heads:
        if name not in with_heads:
            problems.append(
                f"[decision] atypical_heads names {name!r}, which is not a classifier with an atypical_output"
                f" (those are: {', '.join(sorted(with_heads)) or 'none'})"
            )
    if classifiers and not any(c.votes_on_mitotic for c in classifiers):
        problems.append(
            "[[classifier]] no member votes on MF: give at least one classifier with a mitotic_output a positive weight"
        )
    return spec


# ---------------------------------------------------------------------------------------------
# checking ONNX graphs against the manifest


def graph_specs(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """Inputs (initializers excluded), outputs and the default-domain opset of an ONNX file."""
    onnx = import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        except (KeyError, ValueError, TypeError):
            dtype = f"onnx-type-{tensor.elem_type}"
        dims: tuple[int | None, ...] = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim
        )
        return TensorSpec(value.name, dtype, dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return inputs, outputs, opset


def check_model_file(model: ModelSpec) -> list[str]:
    """Every difference between one model's manifest entry and its ONNX file (empty when they agree)."""
    where = f"{model.path.name} ({model.name})"
    if not model.path.is_file():
        return [f"{where}: file {model.path} does not exist"]
    size = model.path.stat().st_size
    if size > MAX_MODEL_BYTES:
        return [f"{where}: {size / 2**30:.1f} GiB, more than an ONNX file can hold ({MAX_MODEL_BYTES >> 30} GiB); "
                "not read"]
    problems: list[str] = []
    found_sha = sha256_file(model.path)
    if not model.sha256:
        problems.append(
            f"{where}: sha256 is empty; run sha256sum {model.path} and put the hash in the manifest"
        )  # the hash is not echoed here either (see below)
    elif found_sha != model.sha256:
        # The hash found is not echoed: the message may reach someone who cannot read the file.
        log.info("%s: sha256 found %s, the manifest says %s", model.path, found_sha, model.sha256)
        problems.append(
            f"{where}: sha256 differs from the manifest's {model.sha256} (the file changed, or update the manifest "
            f"with `sha256sum {model.path.name}`)"
        )
    try:
        inputs, outputs, opset = graph_specs(model.path)
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx raises many types for a damaged file; all mean "not ONNX"
        return [*problems, f"{where}: not a readable ONNX model: {exc}"]
    if opset and opset < MIN_OPSET:
        problems.append(f"{where}: opset {opset} is older than {MIN_OPSET}; re-export with opset >= 17")
    problems.extend(_check_input(where, model, inputs))
    by_name = {o.name: o for o in outputs}
    if isinstance(model, DetectorSpec):
        problems.extend(_check_detector_output(where, model, by_name))
    elif isinstance(model, ClassifierSpec):
        heads = [("mitotic", model.mitotic), ("atypical", model.atypical)]
        for label, head in heads:
            if head is not None:
                problems.extend(_check_head(where, label, head, by_name))
    return problems


def _names(specs: Any) -> str:
    return ", ".join(s.describe() for s in specs) or "none"


def _check_input(where: str, model: ModelSpec, inputs: list[TensorSpec]) -> list[str]:
    want = model.input_spec
    if len(inputs) != 1:
        return [f"{where}: expected exactly one input {want.describe()}, found {_names(inputs)}"]
    got = inputs[0]
    if got.dtype in _FLOAT_TYPES:  # an unwrapped float model: name and layout differences follow from that
        return [
            f"{where}: input {got.name} dtype expected uint8 (NHWC RGB), found {got.dtype}; wrap it with: "
            f"mitosis-edge engines wrap {model.path.name} --bundle {model.path.parent} --model {model.name}"
        ]
    problems: list[str] = []
    if got.name != want.name:
        problems.append(f"{where}: input name expected {want.name!r}, found {got.name!r}")
    if got.dtype != "uint8":
        problems.append(f"{where}: input {got.name} dtype expected uint8 (NHWC RGB), found {got.dtype}")
    if got.rank != 4:
        problems.append(f"{where}: input {got.name} expected rank 4 {want.describe()}, found {got.describe()}")
        return problems
    if got.shape[0] is not None:
        problems.append(
            f"{where}: input {got.name} batch dimension expected dynamic, found fixed {got.shape[0]}"
            " (export with a dynamic batch axis)"
        )
    for axis, label in ((1, "height"), (2, "width"), (3, "channels")):
        if got.shape[axis] != want.shape[axis]:
            problems.append(
                f"{where}: input {got.name} {label} (axis {axis}) expected {want.shape[axis]},"
                f" found {'dynamic' if got.shape[axis] is None else got.shape[axis]}"
            )
    return problems


def _check_detector_output(where: str, model: DetectorSpec, outputs: dict[str, TensorSpec]) -> list[str]:
    if model.output not in outputs:
        return [f"{where}: output {model.output!r} not in the graph; outputs are {_names(outputs.values())}"]
    got = outputs[model.output]
    c = len(model.classes)
    expected = {
        "yolo_raw": ("[B, N, 5+C]", (None, None, 5 + c), 2),
        "yolov8": ("[B, 4+C, N]", (None, 4 + c, None), 1),
        "boxes": ("[B, K, 6]", (None, None, 6), 2),
    }[model.output_format]
    label, shape, fixed_axis = expected
    problems = []
    if got.dtype not in _FLOAT_TYPES:
        problems.append(f"{where}: output {got.name} dtype expected float32 or float16, found {got.dtype}")
    if got.rank != 3:
        problems.append(
            f"{where}: output {got.name} expected rank 3 {label} for {model.output_format}, found {got.describe()}"
        )
        return problems
    if got.shape[0] is not None:
        problems.append(f"{where}: output {got.name} batch dimension expected dynamic, found fixed {got.shape[0]}")
    if got.shape[fixed_axis] is not None and got.shape[fixed_axis] != shape[fixed_axis]:
        problems.append(
            f"{where}: output {got.name} axis {fixed_axis} expected {shape[fixed_axis]} ({label} with C={c} classes "
            f"{list(model.classes)}), found {got.shape[fixed_axis]}"
        )
    return problems


def _check_head(where: str, label: str, head: HeadSpec, outputs: dict[str, TensorSpec]) -> list[str]:
    if head.output not in outputs:
        return [
            f"{where}: {label} head output {head.output!r} not in the graph; outputs are {_names(outputs.values())}"
        ]
    got = outputs[head.output]
    problems = []
    if got.dtype not in _FLOAT_TYPES:
        problems.append(f"{where}: {label} head {got.name} dtype expected float32 or float16, found {got.dtype}")
    if got.rank not in (1, 2):
        problems.append(f"{where}: {label} head {got.name} expected rank 1 [B] or 2 [B,K], found {got.describe()}")
    elif got.rank == 2 and got.shape[1] is not None:
        k = got.shape[1]
        if head.index is None and k != 1:
            problems.append(
                f"{where}: {label} head {got.name} has {k} columns; set {label}_index to the positive column"
            )
        elif head.index is not None and head.index >= k:
            problems.append(f"{where}: {label}_index={head.index} is outside the {k} columns of {got.name}")
    if got.rank >= 1 and got.shape[0] is not None:
        problems.append(
            f"{where}: {label} head {got.name} batch dimension expected dynamic, found fixed {got.shape[0]}"
        )
    return problems


def import_onnx() -> Any:
    """The onnx package (a dependency), imported lazily with an install hint."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency; this guards a broken install
        raise ManifestError(
            "onnx", ["the 'onnx' package is needed to check and wrap models: pip install 'onnx>=1.16'"]
        ) from None
    return onnx
