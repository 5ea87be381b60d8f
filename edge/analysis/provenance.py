"""Where a result came from: package version, model bundle, backend, settings and stage timings.

Built once per slide by the pipeline (`Provenance`), written into result.json and the store by
`to_json_dict`, and read back (from files and store rows of any version) by `from_json_dict`.
The keys in result.json are those mitosis-edge has always written: ``"package"`` and ``"version"``
(the mitosis-edge version, which the gRPC API calls ``Provenance.package_version``). A reader also
takes ``"package_version"``, the key docs/results.md once documented, so a hand-written file reads too.

Pure: stdlib only, so the service and the client-side converters may import it.

    >>> p = Provenance.from_json_dict({"version": "1.2.0", "backend": "onnxruntime",
    ...                                "bundle": {"name": "demo", "version": "3"}})
    >>> p.package_version, p.bundle.name, p.bundle.version, p.backend
    ('1.2.0', 'demo', '3', 'onnxruntime')
    >>> Provenance.from_json_dict({"package_version": "0.9.0", "bundle": "demo"}).package_version
    '0.9.0'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PACKAGE", "BundleProvenance", "Provenance"]

PACKAGE = "mitosis-edge"


@dataclass(frozen=True)
class BundleProvenance:
    """The model bundle that produced a result: its name, version, files and their sha256s."""

    name: str
    version: str = ""
    path: str = ""
    manifest_sha256: str = ""
    models: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # model name -> {"file", "sha256"}
    intended_use: str = ""
    ensemble: Mapping[str, Any] = field(default_factory=dict)  # Bundle.ensemble_roles()

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "path": self.path,
            "manifest_sha256": self.manifest_sha256,
            "models": {name: dict(model) for name, model in self.models.items()},
            "intended_use": self.intended_use,
            "ensemble": dict(self.ensemble),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any] | str | None) -> BundleProvenance:
        """Lenient: a store row of an early version held only the bundle's name as a string."""
        if not isinstance(data, Mapping):
            return cls(name=str(data or ""))
        models = data.get("models")
        ensemble = data.get("ensemble")
        return cls(
            name=str(data.get("name") or ""),
            version=str(data.get("version") or ""),
            path=str(data.get("path") or ""),
            manifest_sha256=str(data.get("manifest_sha256") or ""),
            models={str(k): dict(v) for k, v in models.items() if isinstance(v, Mapping)}
            if isinstance(models, Mapping) else {},
            intended_use=str(data.get("intended_use") or ""),
            ensemble=dict(ensemble) if isinstance(ensemble, Mapping) else {},
        )


@dataclass(frozen=True)
class Provenance:
    """One result's provenance, as written to result.json (``to_json_dict``) and sent over gRPC."""

    version: str  # the mitosis-edge version that analysed the slide
    created_at: str  # ISO 8601, UTC, seconds
    bundle: BundleProvenance
    backend: str  # "onnxruntime", "tensorrt", ...
    plan_keys: Mapping[str, str] = field(default_factory=dict)  # TensorRT cache key per model
    settings: Mapping[str, Any] = field(default_factory=dict)  # Config.to_dict()
    timings_s: Mapping[str, float] = field(default_factory=dict)  # wall seconds per stage
    package: str = PACKAGE

    @property
    def package_version(self) -> str:
        """The gRPC API's name for `version`."""
        return self.version

    def to_json_dict(self) -> dict[str, Any]:
        """The "provenance" object of result.json, keys in the order they have always been written."""
        return {
            "package": self.package,
            "version": self.version,
            "created_at": self.created_at,
            "bundle": self.bundle.to_json_dict(),
            "backend": self.backend,
            "plan_keys": dict(self.plan_keys),
            "settings": dict(self.settings),
            "timings_s": dict(self.timings_s),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any] | None) -> Provenance:
        """Read a "provenance" object back; keys an older file lacks read as empty."""
        data = data or {}
        timings = data.get("timings_s")
        plan_keys = data.get("plan_keys")
        settings = data.get("settings")
        return cls(
            version=str(data.get("version") or data.get("package_version") or ""),
            created_at=str(data.get("created_at") or ""),
            bundle=BundleProvenance.from_json_dict(data.get("bundle")),
            backend=str(data.get("backend") or ""),
            plan_keys={str(k): str(v) for k, v in plan_keys.items()} if isinstance(plan_keys, Mapping) else {},
            settings=dict(settings) if isinstance(settings, Mapping) else {},
            timings_s={str(k): float(v) for k, v in timings.items() if isinstance(v, int | float)}
            if isinstance(timings, Mapping) else {},
            package=str(data.get("package") or PACKAGE),
        )
