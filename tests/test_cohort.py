"""`cohort run`: slide lists, case ids, the durable results table, resuming, failures, and the run on Ray."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.cli import main
from edge.config import Config
from edge.errors import ConfigError
from edge.study.cohort import (
    BundleKey,
    CohortSlide,
    PlannedSlide,
    ResultsTable,
    case_id_for,
    list_slides,
    plan_run,
    run_cohort,
)
from tests.conftest import SynthFactory

KEY = BundleKey("demo", "1", "ab")


def test_the_case_id_is_the_tcga_patient_barcode_or_the_file_stem() -> None:
    assert case_id_for("/a/TCGA-A2-A0T2-01Z-00-DX1.0F5B9D1C.svs") == "TCGA-A2-A0T2"
    assert case_id_for("/a/tcga-cr-7395-01a-01-ts1.svs") == "TCGA-CR-7395"
    assert case_id_for("/a/S21-04711.mrxs") == "S21-04711"
    assert case_id_for("/a/slide 7.ome.tiff") == "slide 7"


def test_a_folder_lists_slides_by_the_watchers_rules(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.svs").write_bytes(b"x")
    (tmp_path / "dicom").mkdir()
    for i in range(2):
        (tmp_path / "dicom" / f"{i}.dcm").write_bytes(b"x")
    (tmp_path / "X.mrxs").write_bytes(b"x")
    (tmp_path / "X").mkdir()
    (tmp_path / "X" / "Data0000.dat").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no slide")
    (tmp_path / "b.svs.part").write_bytes(b"x")
    slides = list_slides(tmp_path)
    assert sorted(s.path.relative_to(tmp_path).as_posix() for s in slides) == ["X.mrxs", "dicom", "sub/a.svs"]


def test_a_csv_gives_paths_case_ids_mpp_and_keeps_extra_columns(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text(
        "slide_path,case_id,mpp,site\nscans/a.svs,P1,0.25,Utrecht\n/b/TCGA-AB-1234-x.svs,,,Vienna\n")
    a, b = list_slides(tmp_path / "list.csv")
    assert (a.path, a.case_id, a.mpp, dict(a.extra)) == (tmp_path / "scans" / "a.svs", "P1", 0.25, {"site": "Utrecht"})
    assert (b.case_id, b.mpp) == ("TCGA-AB-1234", None)


@pytest.mark.parametrize(
    ("text", "message"),
    [("path\nx.svs\n", "no 'slide_path' column"), ("slide_path,mpp\nx.svs,-1\n", "mpp='-1' must be a positive")],
)
def test_a_bad_slide_list_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(ConfigError, match=message):
        list_slides(tmp_path / "list.csv")


def test_a_row_cut_short_by_a_killed_run_is_dropped_and_runs_again(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path)
    table.append({"slide_id": "a", "status": "done", "fingerprint": "sha256:1", "bundle_sha256": "ab"})
    with (tmp_path / "slides.csv").open("a") as fh:
        fh.write("b,/x/b.svs,b,do")  # the driver died in the middle of this line
    reopened = ResultsTable(tmp_path, ["site"])
    assert list(reopened.rows) == ["a"]
    assert (tmp_path / "slides.csv").read_text().endswith("\n")
    assert "site" in (tmp_path / "slides.csv").read_text().splitlines()[0]


def test_a_rerun_skips_done_slides_and_failed_ones_unless_asked() -> None:
    def planned(name: str, fp: str) -> PlannedSlide:
        return PlannedSlide(CohortSlide(Path(name), name), name, fp)

    rows = {
        "done": {"status": "done", "fingerprint": "sha256:1", "bundle_sha256": "ab"},
        "failed": {"status": "failed", "fingerprint": "sha256:2", "bundle_sha256": "ab"},
        "changed": {"status": "done", "fingerprint": "sha256:old", "bundle_sha256": "ab"},
        "other-bundle": {"status": "done", "fingerprint": "sha256:4", "bundle_sha256": "cd"},
    }
    slides = [planned("done", "sha256:1"), planned("failed", "sha256:2"), planned("changed", "sha256:3"),
              planned("other-bundle", "sha256:4"), planned("new", "sha256:5")]
    plan = plan_run(slides, rows, KEY, retry_failed=False)
    assert [p.slide_id for p in plan.todo] == ["changed", "other-bundle", "new"]
    assert [p.slide_id for p in plan.skipped_done] == ["done"]
    assert [p.slide_id for p in plan.skipped_failed] == ["failed"]
    assert [p.slide_id for p in plan_run(slides, rows, KEY, retry_failed=True).todo] == [
        "failed", "changed", "other-bundle", "new"]


def test_without_ray_the_command_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], synth_slide: SynthFactory
                                                      ) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    slide = synth_slide(width=2048, height=2048, seed=3)
    assert main(["cohort", "run", "--slides", str(slide.parent), "--out", str(tmp_path / "out")]) == 1
    assert 'pip install "mitosis-edge[cohort]"' in capsys.readouterr().err


# --- on Ray (one local session for the module) -----------------------------------------------------


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "mitosis-edge[cohort]"')
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, synth_slide: SynthFactory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    for i, seed in enumerate((3, 4)):
        (folder / f"TCGA-AA-000{i}-01Z-00-DX1.tiff").symlink_to(synth_slide(width=2048, height=2048, seed=seed))
    (folder / "broken.svs").write_bytes(b"not a slide at all" * 100)
    return folder


@pytest.mark.slow
def test_cohort_run_analyses_each_slide_once_and_fails_the_corrupt_one_alone(
    ray_session: None, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["cohort", "run", "--slides", str(archive), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "1 slide(s) failed" in captured.err
    assert "broken.svs: CorruptSlideError" in captured.out
    rows = ResultsTable(out).rows
    by_case = {r["case_id"]: r for r in rows.values()}
    assert sorted(by_case) == ["TCGA-AA-0000", "TCGA-AA-0001", "broken"]
    assert [by_case[c]["status"] for c in sorted(by_case)] == ["done", "done", "failed"]
    done = by_case["TCGA-AA-0000"]
    assert int(done["hotspot_mc"]) > 0 and done["bundle_name"] == "demo" and float(done["tissue_mm2"]) > 0
    assert (out / "slides" / done["slide_id"] / "result.json").is_file()
    assert len((out / "slides.csv").read_text().splitlines()) == 4  # header + one row per slide

    # interrupted: the driver died before the second slide's row was written, and in the middle of a line
    lines = (out / "slides.csv").read_text().splitlines(keepends=True)
    kept = [line for line in lines if "TCGA-AA-0001" not in line]
    (out / "slides.csv").write_text("".join(kept) + "TCGA-AA-0001-01Z-00-DX1.tiff-12,/x,TCGA-AA-0001,do")
    summary = run_cohort(list_slides(archive), out, Config())
    assert (summary.done, summary.skipped_done, summary.failed, summary.skipped_failed) == (1, 1, 0, 1)
    assert {r["status"] for r in ResultsTable(out).rows.values()} == {"done", "failed"}

    again = run_cohort(list_slides(archive), out, Config(), retry_failed=True)
    assert (again.done, again.skipped_done, again.failed) == (0, 2, 1)
    assert "CorruptSlideError" in again.failures[0][1]


# --- a worker that dies, with an in-memory stand-in for Ray's scheduling calls ----------------------


class _ActorDied(Exception):
    pass


class _Ref:
    def __init__(self, outcome: object) -> None:
        self.outcome = outcome


class _FakeRay:
    """ray.remote(cls).options(...).remote(...), wait, get, kill and cluster_resources, run synchronously here."""

    class exceptions:
        RayActorError = _ActorDied

    def __init__(self, dies_on: dict[str, int]) -> None:
        self.dies_on = dies_on  # slide file name -> how many of its attempts kill the worker
        self.actors_started = 0

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def remote(self, cls: type) -> _FakeRay:
        return self

    def options(self, **kw: object) -> _FakeActorClass:
        return _FakeActorClass(self)

    def wait(self, refs: list[_Ref], num_returns: int) -> tuple[list[_Ref], list[_Ref]]:
        return refs[:1], refs[1:]

    def get(self, ref: _Ref) -> object:
        if isinstance(ref.outcome, Exception):
            raise ref.outcome
        return ref.outcome

    def kill(self, actor: object, no_restart: bool = True) -> None:
        pass


class _FakeActorClass:
    def __init__(self, ray: _FakeRay) -> None:
        self.ray = ray

    def remote(self, config: Config, cpus: int) -> _FakeActor:
        self.ray.actors_started += 1
        return _FakeActor(self.ray)


class _FakeActor:
    def __init__(self, ray: _FakeRay) -> None:
        self.ray = ray
        self.analyze = self

    def remote(self, p: PlannedSlide, out: str, key: BundleKey, attempt: int) -> _Ref:
        if self.ray.dies_on.get(p.slide.path.name, 0) >= attempt:
            return _Ref(_ActorDied("the actor died unexpectedly"))
        return _Ref({"slide_id": p.slide_id, "slide_path": str(p.slide.path), "status": "done", "error": "",
                     "node": "n1", "worker_pid": "1", "attempt": str(attempt)})


def test_a_worker_killed_mid_slide_costs_that_slide_one_retry_and_nothing_else(tmp_path: Path) -> None:
    from edge.study.cohort import CohortSummary, _schedule

    fake = _FakeRay({"b.svs": 1, "c.svs": 5})  # b's worker is killed once; c kills every worker it meets
    names = ("a.svs", "b.svs", "c.svs", "d.svs")
    slides = [PlannedSlide(CohortSlide(tmp_path / n, n), n, "sha256:" + n) for n in names]
    table = ResultsTable(tmp_path / "out")
    summary = CohortSummary(total=4)
    _schedule(fake, slides, tmp_path / "out", Config(), KEY, table, summary, 1.0, 0.0, 0, None)
    rows = ResultsTable(tmp_path / "out").rows
    assert {k: (r["status"], r["attempt"]) for k, r in rows.items()} == {
        "a.svs": ("done", "1"), "b.svs": ("done", "2"), "c.svs": ("failed", "2"), "d.svs": ("done", "1")}
    assert "died on this slide 2 times" in rows["c.svs"]["error"]
    assert (summary.done, summary.failed, summary.retried) == (3, 1, 2)
    assert fake.actors_started == 2 + 3  # two workers, and a new one after each of the three deaths
