"""The project's words are defined once (edge.vocab); every other list of them is derived from, or checked
against, that one place: detection classes, subtypes, slide extensions, exit codes."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import pytest

from edge.analysis.exports import CLASS_NAMES
from edge.analysis.scoring import Figure, SubtypeCounts
from edge.vocab import SUBTYPES, DetectionClass, ExitCode, detection_class


def _figure(is_mitotic: bool, subtype: str | None) -> Figure:
    return Figure(x_px=10.0, y_px=20.0, x_um=2.5, y_um=5.0, width_px=50.0, height_px=50.0, detector_score=0.8,
                  p_mitotic=0.9 if is_mitotic else 0.2, p_atypical=0.5, is_mitotic=is_mitotic,
                  subtype=subtype)  # type: ignore[arg-type]


CASES = [
    ((True, "normal"), DetectionClass.NORMAL),
    ((True, "atypical"), DetectionClass.ATYPICAL),
    ((True, "uncertain"), DetectionClass.UNCERTAIN),
    ((True, None), DetectionClass.UNCERTAIN),  # no atypical head: an MF of unknown subtype
    ((False, None), DetectionClass.NON_MITOTIC),
    ((False, "atypical"), DetectionClass.NON_MITOTIC),  # not mitotic wins over any subtype
]


@pytest.mark.parametrize(("decisions", "expected"), CASES)
def test_the_figure_to_class_rule(decisions: tuple[bool, str | None], expected: DetectionClass) -> None:
    assert detection_class(*decisions) is expected
    assert _figure(*decisions).detection_class is expected


def test_subtypes_are_the_classes_of_mitotic_figures() -> None:
    assert tuple(c.value for c in DetectionClass if c is not DetectionClass.NON_MITOTIC) == SUBTYPES


def test_the_store_the_proto_the_client_and_the_review_page_use_the_same_classes() -> None:
    from edge import client
    from edge._proto import edge_pb2 as pb
    from edge.service import store, web

    words = tuple(c.value for c in DetectionClass)
    assert words == store.DETECTION_CLASSES
    assert words == client.DETECTION_CLASSES
    assert words == web.GROUPS
    proto = [n.removeprefix("DETECTION_CLASS_").lower() for n in (v.name for v in pb.DetectionClass.DESCRIPTOR.values)]
    assert proto == ["unspecified", *words]


def test_the_stores_sql_check_allows_exactly_the_classes(tmp_path: Path) -> None:
    import re
    import sqlite3

    from edge.service.store import Store

    with Store.open(tmp_path / "edge.db"):
        pass
    with closing(sqlite3.connect(tmp_path / "edge.db")) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'detections'").fetchone()
    checked = re.search(r"CHECK \(class IN \(([^)]*)\)\)", sql)
    assert checked is not None
    assert [w.strip(" '") for w in checked.group(1).split(",")] == [c.value for c in DetectionClass]


@pytest.mark.parametrize(("decisions", "expected"), CASES)
def test_store_grpc_and_exports_classify_a_figure_alike(
    decisions: tuple[bool, str | None], expected: DetectionClass
) -> None:
    from edge.client import _CLASS_NAMES
    from edge.service.server.convert import detection_to_pb
    from edge.service.store import _detection_row

    figure = _figure(*decisions)
    assert _detection_row(1, figure)[1] == expected.value
    assert _CLASS_NAMES[detection_to_pb(figure).detection_class] == expected.value
    # exports keep their QuPath names: the look-alike class is still "Mitotic figure look-alike"
    assert CLASS_NAMES[expected] == {
        "normal": "Mitotic figure (normal)", "atypical": "Mitotic figure (atypical)",
        "uncertain": "Mitotic figure (uncertain subtype)", "non_mitotic": "Mitotic figure look-alike",
    }[expected.value]


def test_counts_follow_the_rule() -> None:
    figures = [_figure(*decisions) for decisions, _ in CASES]
    counts = SubtypeCounts.of(figures)
    assert (counts.mitotic, counts.normal, counts.atypical, counts.uncertain) == (4, 1, 1, 2)


def test_exit_codes_are_the_shells() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 130, 141]


@pytest.mark.parametrize("group", ["client", "qc", "cohort", "engines", "bench"])
def test_a_command_group_without_a_subcommand_prints_help_and_exits_usage(
    group: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli import main

    assert main([group]) == ExitCode.USAGE == 2
    assert "usage: mitosis-edge" in capsys.readouterr().out
