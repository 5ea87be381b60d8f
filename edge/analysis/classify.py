"""Second stage: crop windows around candidates, classifier heads to probabilities, ensemble, decisions.

Pure numpy/scipy. The seed paper's rule: the ensemble's weighted mean p(MF) decides mitotic or not;
the atypical head counts only where it is confident (above 0.9 atypical, below 0.1 normal), the rest
is "uncertain" and stays out of the atypical ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit, softmax

from edge.errors import ConfigError, EngineError
from edge.vocab import SUBTYPES, Subtype

if TYPE_CHECKING:
    from edge.engines.manifest import ClassifierSpec, DecisionSpec, HeadSpec

__all__ = [
    "SUBTYPES",
    "Subtype",
    "atypical_probability",
    "classifier_outputs_to_probabilities",
    "crop_origins",
    "decide",
    "ensemble_mitotic",
    "head_probability",
]

FloatArray = NDArray[np.float64]


def crop_origins(
    x_px: np.ndarray, y_px: np.ndarray, size_out: int, px0_per_out: tuple[float, float]
) -> tuple[FloatArray, FloatArray]:
    """Level-0 top-left corners of ``size_out``-px crops (at the classifier's mpp) centred on level-0 points.

    ``x0 = x_px - size_out / 2 * px0_per_out_x``, as floats: the reader resamples anyway, and a
    corner may be negative or past the slide's edge (the reader pads outside the slide with white).

    >>> crop_origins(np.array([100.0]), np.array([40.0]), 64, (2.0, 2.0))
    (array([36.]), array([-24.]))
    """
    if size_out <= 0:
        raise ValueError(f"size_out={size_out!r} must be a positive number of px")
    fx, fy = px0_per_out
    x = np.asarray(x_px, dtype=np.float64)
    y = np.asarray(y_px, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x_px has shape {x.shape} but y_px has shape {y.shape}")
    half = size_out / 2.0
    return x - half * fx, y - half * fy


def head_probability(output: np.ndarray, head: HeadSpec) -> FloatArray:
    """Probability of the head's positive class per crop, float64 of shape [B].

    ``[B]`` or ``[B, 1]``: the score itself (a sigmoid first for logits). ``[B, K]``: column
    ``head.index`` (a softmax over the K columns first for logits, since logits of one column alone
    say nothing about the others).
    """
    values = np.asarray(output)
    if values.ndim == 2 and values.shape[1] == 1:
        if head.index not in (None, 0):
            raise EngineError(f"head {head.output!r}: index={head.index} but the output has shape {list(values.shape)}")
        values = values[:, 0]
    if values.ndim == 1:
        scores = values.astype(np.float64)
        return np.asarray(expit(scores) if head.scores == "logits" else scores, dtype=np.float64)
    if values.ndim != 2:
        raise EngineError(f"head {head.output!r}: expected shape [B], [B, 1] or [B, K], found {list(values.shape)}")
    k = values.shape[1]
    if head.index is None or not 0 <= head.index < k:
        raise EngineError(
            f"head {head.output!r}: output of shape {list(values.shape)} needs an index in [0, {k}), got {head.index}"
        )
    scores = values.astype(np.float64)
    if head.scores == "logits":
        scores = softmax(scores, axis=1)
    return np.ascontiguousarray(scores[:, head.index])


def ensemble_mitotic(p_by_model: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> FloatArray:
    """Weighted mean p(MF) over the ensemble's models (weights need not sum to 1; weight 0 leaves a model out).

    Every model in ``p_by_model`` needs a weight, and every model with a positive weight needs
    probabilities: a name that differs is a wiring mistake, not something to average around.

    >>> ensemble_mitotic({"a": np.array([1.0]), "b": np.array([0.0])}, {"a": 3.0, "b": 1.0})
    array([0.75])
    """
    unweighted = sorted(set(p_by_model) - set(weights))
    if unweighted:
        raise ConfigError(f"models {unweighted} have probabilities but no ensemble weight (weights: {dict(weights)})")
    for name, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"ensemble weight of {name!r} is {w!r}; it must be a finite number >= 0")
    used = {name: w for name, w in weights.items() if w > 0}
    if not used:
        raise ConfigError(f"every ensemble weight is 0 ({dict(weights)}); at least one model must count")
    missing = sorted(set(used) - set(p_by_model))
    if missing:
        raise ConfigError(f"models {missing} have a positive weight but no probabilities (got {sorted(p_by_model)})")
    total = math.fsum(used.values())
    arrays = {name: np.asarray(p_by_model[name], dtype=np.float64) for name in used}
    _same_shape(arrays)
    mean = sum(arrays[name] * (w / total) for name, w in used.items())
    return np.asarray(mean, dtype=np.float64)


def atypical_probability(p_by_model: Mapping[str, np.ndarray], chosen: Sequence[str]) -> FloatArray | None:
    """Mean p(atypical) over the ``chosen`` models' atypical heads; None when none is chosen."""
    if not chosen:
        return None
    missing = [name for name in chosen if name not in p_by_model]
    if missing:
        raise ConfigError(f"atypical heads {missing} were chosen but have no probabilities (got {sorted(p_by_model)})")
    arrays = {name: np.asarray(p_by_model[name], dtype=np.float64) for name in chosen}
    _same_shape(arrays)
    return np.asarray(np.mean([arrays[name] for name in chosen], axis=0), dtype=np.float64)


def decide(
    p_mitotic: np.ndarray, p_atypical: np.ndarray | None, decision: DecisionSpec
) -> tuple[NDArray[np.bool_], NDArray[np.str_]]:
    """(is_mitotic, subtype) per candidate.

    ``is_mitotic``: p_mitotic >= ``decision.mitotic_threshold`` (equality counts). ``subtype`` for an MF:
    "atypical" when p_atypical > ``atypical_above``, "normal" when p_atypical < ``normal_below``, else
    "uncertain" (both cut-offs themselves are uncertain: only a confident head counts); "" for a
    candidate that is no MF. Without an atypical head every MF is "uncertain".

    >>> from edge.engines.manifest import DecisionSpec
    >>> decide(np.array([0.5, 0.6, 0.2]), np.array([0.95, 0.5, 0.99]), DecisionSpec())
    (array([ True,  True, False]), array(['atypical', 'uncertain', ''], dtype='<U9'))
    """
    p_mf = np.asarray(p_mitotic, dtype=np.float64)
    if p_mf.ndim != 1:
        raise ValueError(f"p_mitotic must be 1-D, got shape {p_mf.shape}")
    is_mitotic = p_mf >= decision.mitotic_threshold
    subtype = np.full(p_mf.shape, "uncertain", dtype="<U9")
    if p_atypical is not None:
        p_amf = np.asarray(p_atypical, dtype=np.float64)
        if p_amf.shape != p_mf.shape:
            raise ValueError(f"p_atypical has shape {p_amf.shape} but p_mitotic has shape {p_mf.shape}")
        subtype[p_amf > decision.atypical_above] = "atypical"
        subtype[p_amf < decision.normal_below] = "normal"
    subtype[~is_mitotic] = ""
    return is_mitotic, subtype


def classifier_outputs_to_probabilities(
    outputs: Mapping[str, np.ndarray], spec: ClassifierSpec
) -> tuple[FloatArray | None, FloatArray | None]:
    """(p_mitotic, p_atypical) of one classifier from its engine outputs by name (None for a head it lacks)."""
    p_mitotic = None if spec.mitotic is None else head_probability(
        _output(outputs, spec.mitotic.output, spec.name), spec.mitotic
    )
    if spec.atypical is None:
        return p_mitotic, None
    p_atypical = head_probability(_output(outputs, spec.atypical.output, spec.name), spec.atypical)
    if p_mitotic is not None and p_atypical.shape != p_mitotic.shape:
        raise EngineError(
            f"classifier {spec.name!r}: the atypical head gives {p_atypical.shape[0]} scores, "
            f"the mitotic head {p_mitotic.shape[0]}"
        )
    return p_mitotic, p_atypical


def _output(outputs: Mapping[str, np.ndarray], name: str, model: str) -> np.ndarray:
    try:
        return outputs[name]
    except KeyError:
        raise EngineError(f"classifier {model!r} gave no output {name!r}; outputs: {sorted(outputs)}") from None


def _same_shape(arrays: Mapping[str, NDArray[Any]]) -> None:
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"probabilities of different shapes cannot be combined: {shapes}")
