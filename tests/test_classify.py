"""Crop windows, classifier heads to probabilities, the ensemble and the MF / atypical decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.analysis.classify import (
    atypical_probability,
    classifier_outputs_to_probabilities,
    crop_origins,
    decide,
    ensemble_mitotic,
    head_probability,
)
from edge.engines.manifest import ClassifierSpec, DecisionSpec, HeadSpec
from edge.errors import ConfigError, EngineError


def classifier(atypical: HeadSpec | None = None) -> ClassifierSpec:
    return ClassifierSpec(
        name="densenet",
        role="classifier",
        path=Path("densenet.onnx"),
        sha256="0" * 64,
        input_name="crops",
        size=128,
        mpp=0.25,
        mitotic=HeadSpec("mitotic", index=1, scores="logits"),
        atypical=atypical,
    )


# --- crops ---------------------------------------------------------------------------------------


def test_crop_is_centred_on_the_point() -> None:
    x0, y0 = crop_origins(np.array([1000.0, 64.0]), np.array([500.0, 64.0]), 128, (1.0, 1.0))
    assert x0.tolist() == [936.0, 0.0] and y0.tolist() == [436.0, 0.0]


def test_crop_at_half_resolution_spans_twice_the_level0_px() -> None:
    x0, y0 = crop_origins(np.array([1000.0]), np.array([500.0]), 128, (2.0, 2.0))
    assert (x0.tolist(), y0.tolist()) == ([872.0], [372.0])


def test_crop_may_start_outside_the_slide() -> None:
    x0, y0 = crop_origins(np.array([10.0]), np.array([5.5]), 64, (1.0, 0.5))
    assert (x0.tolist(), y0.tolist()) == ([-22.0], [-10.5])


def test_crop_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="size_out=0"):
        crop_origins(np.zeros(1), np.zeros(1), 0, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"shape \(2,\) but y_px has shape \(3,\)"):
        crop_origins(np.zeros(2), np.zeros(3), 64, (1.0, 1.0))


# --- heads ---------------------------------------------------------------------------------------


def test_single_logit_heads_pass_through_a_sigmoid() -> None:
    head = HeadSpec("mitotic", scores="logits")
    for output in (np.array([0.0, np.log(3.0)]), np.array([[0.0], [np.log(3.0)]], np.float16)):
        np.testing.assert_allclose(head_probability(output, head), [0.5, 0.75], rtol=1e-3)
    assert head_probability(np.array([0.0, 1000.0, -1000.0]), head).tolist() == [0.5, 1.0, 0.0]  # no overflow


def test_single_probability_heads_are_taken_as_they_are() -> None:
    p = head_probability(np.array([[0.2], [0.9]], np.float32), HeadSpec("mitotic", scores="probabilities"))
    assert p.dtype == np.float64 and p.shape == (2,)
    np.testing.assert_allclose(p, [0.2, 0.9], rtol=1e-6)


def test_multi_column_heads_take_the_index_after_a_softmax_of_logits() -> None:
    logits = np.array([[0.0, 0.0], [0.0, np.log(3.0)], [1000.0, -1000.0]])
    np.testing.assert_allclose(head_probability(logits, HeadSpec("h", index=1, scores="logits")), [0.5, 0.75, 0.0])
    probabilities = np.array([[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]])
    np.testing.assert_allclose(
        head_probability(probabilities, HeadSpec("h", index=2, scores="probabilities")), [0.2, 0.4]
    )


@pytest.mark.parametrize(
    ("shape", "head", "message"),
    [
        ((4, 3), HeadSpec("h"), r"'h': output of shape \[4, 3\] needs an index in \[0, 3\), got None"),
        ((4, 3), HeadSpec("h", index=3), r"shape \[4, 3\] needs an index in \[0, 3\), got 3"),
        ((4, 1), HeadSpec("h", index=1), r"index=1 but the output has shape \[4, 1\]"),
        ((4, 2, 2), HeadSpec("h", index=0), r"expected shape \[B\], \[B, 1\] or \[B, K\], found \[4, 2, 2\]"),
    ],
)
def test_head_shape_errors_name_the_shape(shape: tuple[int, ...], head: HeadSpec, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        head_probability(np.zeros(shape, np.float32), head)


def test_one_classifier_outputs_to_probabilities() -> None:
    outputs = {"mitotic": np.array([[0.0, np.log(3.0)]]), "atypical": np.array([[np.log(9.0)]])}
    p_mf, p_amf = classifier_outputs_to_probabilities(outputs, classifier(HeadSpec("atypical")))
    np.testing.assert_allclose(p_mf, [0.75])
    assert p_amf is not None
    np.testing.assert_allclose(p_amf, [0.9])
    assert classifier_outputs_to_probabilities(outputs, classifier())[1] is None
    with pytest.raises(EngineError, match=r"'densenet' gave no output 'amf'; outputs: \['atypical', 'mitotic'\]"):
        classifier_outputs_to_probabilities(outputs, classifier(HeadSpec("amf")))


# --- ensemble ------------------------------------------------------------------------------------


def test_ensemble_is_the_weighted_mean() -> None:
    p = {"densenet": np.array([0.8, 0.0]), "efficientnet": np.array([0.4, 1.0])}
    np.testing.assert_allclose(ensemble_mitotic(p, {"densenet": 0.75, "efficientnet": 0.25}), [0.7, 0.25])
    np.testing.assert_allclose(ensemble_mitotic(p, {"densenet": 3.0, "efficientnet": 1.0}), [0.7, 0.25])


def test_a_model_with_weight_zero_is_ignored() -> None:
    p = {"densenet": np.array([0.8]), "efficientnet": np.array([0.4])}
    np.testing.assert_allclose(ensemble_mitotic(p, {"densenet": 0.5, "efficientnet": 0.0}), [0.8])
    # it need not even have run
    np.testing.assert_allclose(ensemble_mitotic({"densenet": p["densenet"]}, {"densenet": 1, "off": 0}), [0.8])


def test_ensemble_mistakes_are_named() -> None:
    p = {"densenet": np.array([0.8]), "efficientnet": np.array([0.4, 0.1])}
    with pytest.raises(ConfigError, match=r"every ensemble weight is 0"):
        ensemble_mitotic(p, {"densenet": 0.0, "efficientnet": 0.0})
    with pytest.raises(ConfigError, match=r"\['efficientnet'\] have probabilities but no ensemble weight"):
        ensemble_mitotic(p, {"densenet": 1.0})
    with pytest.raises(ConfigError, match=r"\['resnet'\] have a positive weight but no probabilities"):
        ensemble_mitotic({"densenet": p["densenet"]}, {"densenet": 1.0, "resnet": 1.0})
    with pytest.raises(ConfigError, match=r"weight of 'densenet' is -1.0"):
        ensemble_mitotic(p, {"densenet": -1.0, "efficientnet": 1.0})
    with pytest.raises(ValueError, match="different shapes"):
        ensemble_mitotic(p, {"densenet": 1.0, "efficientnet": 1.0})


def test_atypical_probability_is_the_mean_of_the_chosen_heads() -> None:
    p = {"densenet": np.array([0.9, 0.0]), "efficientnet": np.array([0.7, 0.2]), "other": np.array([0.0, 0.0])}
    got = atypical_probability(p, ["densenet", "efficientnet"])
    assert got is not None
    np.testing.assert_allclose(got, [0.8, 0.1])
    assert atypical_probability(p, []) is None
    with pytest.raises(ConfigError, match=r"\['resnet'\] were chosen"):
        atypical_probability(p, ["resnet"])


# --- decisions -----------------------------------------------------------------------------------


def test_decisions_at_the_cut_offs() -> None:
    p_mf = np.full(6, 0.5)  # exactly the threshold: an MF
    p_amf = np.array([0.9, 0.91, 0.09, 0.1, 0.5, 1.0])
    is_mf, subtype = decide(p_mf, p_amf, DecisionSpec())
    assert is_mf.all()
    assert subtype.tolist() == ["uncertain", "atypical", "normal", "uncertain", "uncertain", "atypical"]


def test_non_mitotic_candidates_have_no_subtype() -> None:
    is_mf, subtype = decide(np.array([0.49, 0.95, 0.0]), np.array([0.99, 0.01, 0.01]), DecisionSpec())
    assert is_mf.tolist() == [False, True, False]
    assert subtype.tolist() == ["", "normal", ""]


def test_no_atypical_head_leaves_every_mf_uncertain() -> None:
    is_mf, subtype = decide(np.array([0.7, 0.2]), None, DecisionSpec(mitotic_threshold=0.7))
    assert is_mf.tolist() == [True, False]
    assert subtype.tolist() == ["uncertain", ""]


def test_decisions_of_nothing_and_mismatched_shapes() -> None:
    is_mf, subtype = decide(np.empty(0), np.empty(0), DecisionSpec())
    assert is_mf.shape == subtype.shape == (0,)
    with pytest.raises(ValueError, match=r"p_atypical has shape \(1,\) but p_mitotic has shape \(2,\)"):
        decide(np.zeros(2), np.zeros(1), DecisionSpec())
