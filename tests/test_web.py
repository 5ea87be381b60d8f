"""The pathologist's review page as a lab uses it: a daemon analyses a slide, a reviewer logs in, checks the
hotspot's figures, signs; the review is stored beside the automatic result, published, exported and counted.
Safety: read-only tokens cannot sign, cross-site writes are refused, unknown jobs are 404s, tokens stay out
of URLs and logs. The browser tests drive the system Chromium headless (skipped where none is installed)."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client import generate_latest

from edge.client import EdgeClient
from edge.service.daemon import Daemon
from edge.service.metrics import DaemonMetrics
from edge.service.store import Store
from tests.conftest import LIBRARY_THREADS, SynthFactory
from tests.test_daemon import daemon_config, wait_for

READ_TOKEN = "r" * 24
REVIEW_TOKEN = "v" * 24


@dataclass
class Site:
    daemon: Daemon
    job_id: int
    host: str
    tmp: Path
    logs: list[str]

    def store(self) -> Store:
        return self.daemon.store


class _Capture(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """conftest's check, except for the gRPC pool's workers: they belong to the module's daemon (started on
    demand by the client calls here) and end when it stops, after the module."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
              and not t.name.startswith((*LIBRARY_THREADS, "edge-grpc_"))]
    for t in leaked:
        t.join(timeout=2.0)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, synth_slide: SynthFactory) -> Iterator[Site]:
    """A serving daemon with the review page, one synthetic slide analysed."""
    tmp = tmp_path_factory.mktemp("web")
    tokens = tmp / "tokens"
    tokens.write_text(f"{READ_TOKEN} read viewer\n{REVIEW_TOKEN} review dr-smith\n")
    tokens.chmod(0o600)
    config = daemon_config(tmp, **{"web.listen": "127.0.0.1:0", "server.tokens_file": str(tokens),
                                   "watch.accession_pattern": r"(?P<accession>S\d{2}-\d+)"})
    logs: list[str] = []
    handler = _Capture(logs)
    logging.getLogger("edge").addHandler(handler)
    logging.getLogger("edge").setLevel(logging.DEBUG)
    daemon = Daemon(config).start()
    try:
        shutil.copy(synth_slide(width=3072, height=2560, seed=1), tmp / "inbox" / "S26-0007_case-7.tiff")
        wait_for(lambda: any(j.state == "done" for j in daemon.store.list_jobs()), what="the slide analysed")
        job_id = daemon.store.list_jobs()[0].job_id
        yield Site(daemon, job_id, daemon.web_address(), tmp, logs)
    finally:
        daemon.stop(grace=0.0)
        logging.getLogger("edge").removeHandler(handler)


def request(site: Site, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(site.host, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def login(site: Site, token: str) -> str:
    """The session cookie a browser gets for this token at the login form."""
    status, headers, _ = request(site, "POST", "/login", urllib.parse.urlencode({"token": token}).encode(),
                                 {"Origin": f"http://{site.host}", "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303, status
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return cookie.split(";", 1)[0]


def csrf_of(site: Site, cookie: str) -> str:
    _, _, page = request(site, "GET", f"/jobs/{site.job_id}", headers={"Cookie": cookie})
    text = page.decode()
    start = text.index('name="csrf-token" content="') + len('name="csrf-token" content="')
    return text[start:text.index('"', start)]


def sign(site: Site, cookie: str, changes: list[dict[str, Any]], *, origin: str | None = None,
         csrf: str | None = None) -> tuple[int, dict[str, Any]]:
    created = site.store().get_result(site.job_id).created_at
    headers = {"Cookie": cookie, "Content-Type": "application/json", "Accept": "application/json",
               "Origin": origin or f"http://{site.host}",
               "X-CSRF-Token": csrf_of(site, cookie) if csrf is None else csrf}
    status, _, body = request(site, "POST", f"/jobs/{site.job_id}/review",
                              json.dumps({"changes": changes, "result_created_at": created}).encode(), headers)
    return status, json.loads(body)


def hotspot_ids(site: Site) -> dict[int, str]:
    from edge.service.web import WebApp

    app = WebApp(site.daemon.config, site.store(), site.daemon.results_dir)
    return {f.detection_id: f.kind for f in app.hotspot_figures(site.store().get_result(site.job_id))}


# --- without a browser ------------------------------------------------------------------------------
def test_pages_need_a_login_and_the_token_is_exchanged_for_a_cookie_never_put_in_a_url(site: Site) -> None:
    status, headers, _ = request(site, "GET", "/")
    assert status == 303 and headers["Location"] == "/login"
    status, _, page = request(site, "POST", "/login", b"token=" + b"x" * 24,
                              {"Origin": f"http://{site.host}"})
    assert status == 401 and b"Unknown token" in page
    cookie = login(site, READ_TOKEN)
    status, _, page = request(site, "GET", "/", headers={"Cookie": cookie})
    assert status == 200 and b"case-7.tiff" in page and b"state-done" in page
    assert not any(READ_TOKEN in line or REVIEW_TOKEN in line for line in site.logs)


def test_a_read_only_token_views_but_cannot_sign(site: Site) -> None:
    cookie = login(site, READ_TOKEN)
    status, _, page = request(site, "GET", f"/jobs/{site.job_id}", headers={"Cookie": cookie})
    assert status == 200 and b"signing needs a token with role review" in page and b'id="sign"' not in page
    status, body = sign(site, cookie, [])
    assert status == 403 and "signing needs role review" in body["error"]


def test_a_forged_cross_site_post_is_refused(site: Site) -> None:
    cookie = login(site, REVIEW_TOKEN)
    before = len(site.store().list_reviews(job_id=site.job_id))
    status, body = sign(site, cookie, [], origin="https://evil.example")
    assert status == 403 and "cross-site" in body["error"]
    status, body = sign(site, cookie, [], csrf="not-the-token")
    assert status == 403 and "CSRF" in body["error"]
    status, _, _ = request(site, "POST", f"/jobs/{site.job_id}/review", b"{}",
                           {"Cookie": cookie, "Content-Type": "application/json"})  # no Origin, no Referer
    assert status == 403
    assert len(site.store().list_reviews(job_id=site.job_id)) == before


def test_an_unknown_job_and_unknown_images_are_404s_not_tracebacks(site: Site) -> None:
    cookie = login(site, READ_TOKEN)
    for path in ("/jobs/999999", "/jobs/999999/field.jpg", f"/jobs/{site.job_id}/crops/999999.png",
                 f"/jobs/{site.job_id}/exports/..%2F..%2Fetc%2Fpasswd", "/jobs/1/../../etc/passwd"):
        status, _, page = request(site, "GET", path, headers={"Cookie": cookie})
        assert status == 404, path
        assert b"Traceback" not in page


def test_the_slide_page_shows_the_numbers_the_field_the_crops_and_links_every_export(site: Site) -> None:
    cookie = login(site, READ_TOKEN)
    result = site.store().get_result(site.job_id)
    spot = result.summary["scores"]["hotspot"]
    _, _, page = request(site, "GET", f"/jobs/{site.job_id}", headers={"Cookie": cookie})
    text = page.decode()
    assert f'<dd id="auto-mc">{spot["mitotic"]}</dd>' in text and "accession S26-0007" in text
    assert "<dt>Scan QC</dt><dd>pass</dd>" in text and "NOT for diagnosis" in text  # the bundle's intended use
    for kind in result.exports:
        status, _, data = request(site, "GET", f"/jobs/{site.job_id}/exports/{kind}", headers={"Cookie": cookie})
        assert status == 200 and data == Path(result.exports[kind]).read_bytes()
    status, headers, field = request(site, "GET", f"/jobs/{site.job_id}/field.jpg", headers={"Cookie": cookie})
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and field[:2] == b"\xff\xd8"
    first = next(iter(hotspot_ids(site)))
    status, headers, crop = request(site, "GET", f"/jobs/{site.job_id}/crops/{first}.png", headers={"Cookie": cookie})
    assert status == 200 and crop[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(crop)).size == (site.daemon.config.web.crop_px,) * 2


def test_a_signed_review_is_stored_beside_the_result_published_exported_and_counted(site: Site) -> None:
    cookie = login(site, REVIEW_TOKEN)
    figures = hotspot_ids(site)
    mitotic = [i for i, kind in figures.items() if kind == "normal"]
    after = site.store().last_sequence()
    changes = [{"decision": "reject", "detection_id": mitotic[0]}, {"decision": "atypical", "detection_id": mitotic[1]},
               {"decision": "add", "x_px": 100.0, "y_px": 120.0, "subtype": "normal"}]
    automatic = dict(site.store().get_result(site.job_id).summary["scores"]["hotspot"])
    status, body = sign(site, cookie, changes)
    assert status == 200, body
    assert body["reviewer"] == "dr-smith" and body["counts"]["mitotic"] == automatic["mitotic"]  # -1 +1
    assert site.store().get_result(site.job_id).summary["scores"]["hotspot"] == automatic  # never overwritten
    event = [e for e in site.store().events_after(after) if e.type == "result_reviewed"][-1]
    assert event.payload["mitotic_count"] == body["counts"]["mitotic"] and event.payload["reviewer"] == "dr-smith"
    review_json = json.loads(Path(body["exports"]["review_json"]).read_text())
    assert review_json["changes"] == body["changes"] and len(review_json["changes"]) == 3
    geo = json.loads(Path(body["exports"]["review_geojson"]).read_text())
    assert len(geo["features"]) == len(figures) + 1
    stats = site.store().review_agreement()
    assert stats["reviews"] == 1 and stats["figures_judged"] == len(figures) + 1
    assert stats["figures_agreed"] == len(figures) - 2
    metrics = DaemonMetrics()
    metrics.attach_store(site.store())
    scraped = generate_latest(metrics.registry).decode()
    assert "mitosis_edge_reviewed_jobs 1.0" in scraped and "mitosis_edge_review_count_agreement 1.0" in scraped
    assert f"mitosis_edge_review_figure_agreement {(len(figures) - 2) / (len(figures) + 1)}" in scraped


def test_bad_decisions_are_refused_with_the_reason_and_nothing_is_stored(site: Site) -> None:
    cookie = login(site, REVIEW_TOKEN)
    before = len(site.store().list_reviews())
    status, body = sign(site, cookie, [{"decision": "reject", "detection_id": 987654}])
    assert status == 400 and "not a figure of this hotspot" in body["error"]
    status, body = sign(site, cookie, [{"decision": "maybe", "detection_id": 1}])
    assert status == 400 and "'decision' must be one of" in body["error"]
    assert len(site.store().list_reviews()) == before


# --- in a real browser --------------------------------------------------------------------------------
def chromium() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no Chromium here: apt-get install -y chromium chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1100"):
        options.add_argument(flag)
    import tempfile
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(driver), options=options), profile


def test_a_reviewer_confirms_rejects_and_adds_figures_in_the_browser_and_the_client_gets_the_numbers(
    site: Site, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, profile = chromium()
    shots = Path(os.environ.get("MITOSIS_EDGE_SCREENSHOTS") or tmp_path)  # set it to look at the pages
    shots.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://{site.host}"
        browser.get(base + "/")
        browser.find_element(By.NAME, "token").send_keys(REVIEW_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, f'tr[data-job="{site.job_id}"]'))
        assert REVIEW_TOKEN not in browser.current_url
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{site.job_id}"]')
        assert "done" in row.text and "S26-0007_case-7.tiff" in row.text
        assert row.find_element(By.CSS_SELECTOR, ".qc").text == "pass" and "S26-0007" in row.text  # QC, accession
        browser.save_screenshot(str(shots / "list.png"))
        row.find_element(By.TAG_NAME, "a").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "gallery"))
        auto = site.store().get_result(site.job_id).summary["scores"]["hotspot"]
        assert browser.find_element(By.ID, "auto-mc").text == str(auto["mitotic"])
        WebDriverWait(browser, 10).until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('.fig img')].every(i => i.complete && i.naturalWidth > 0)"))
        figs = browser.find_elements(By.CSS_SELECTOR, ".fig")
        assert len(figs) == len(hotspot_ids(site))
        classes = [f.get_attribute("data-class") for f in figs]
        body = browser.find_element(By.TAG_NAME, "body")
        # keyboard: the first figure is current; c confirms, r rejects, j skips, a makes atypical
        keys = ActionChains(browser)
        keys.send_keys("c").send_keys("r").send_keys("j").send_keys("a").perform()
        decided = {f.get_attribute("data-id"): f.get_attribute("data-decision") or "" for f in figs}
        assert [decided[figs[i].get_attribute("data-id")] for i in range(4)] == ["confirm", "reject", "", "atypical"]
        # mouse: add a missed figure near the field's top left corner, then make it atypical with the keyboard
        field = browser.find_element(By.CSS_SELECTOR, "#field img")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        ActionChains(browser).move_to_element_with_offset(field, -field.size["width"] // 2 + 15,
                                                          -field.size["height"] // 2 + 15).click().perform()
        ActionChains(browser).send_keys("a").perform()
        assert len(browser.find_elements(By.CSS_SELECTOR, ".marker.added.m-atypical")) == 1
        del body
        expected = dict.fromkeys(("normal", "atypical", "uncertain", "non_mitotic"), 0)
        final = [classes[0], "non_mitotic", classes[2], "atypical", *classes[4:]]
        for kind in [*final, "atypical"]:
            expected[kind] += 1
        mc = expected["normal"] + expected["atypical"] + expected["uncertain"]
        assert browser.find_element(By.ID, "rev-mc").text == str(mc)
        browser.save_screenshot(str(shots / "review.png"))
        browser.execute_script("document.getElementById('gallery').scrollIntoView()")
        browser.save_screenshot(str(shots / "gallery.png"))
        after = site.store().last_sequence()
        client = EdgeClient(site.daemon.server.address, token=READ_TOKEN, insecure=True)
        try:
            browser.find_element(By.ID, "sign").click()
            WebDriverWait(browser, 15).until(lambda b: b.find_element(By.ID, "status").text.startswith("Signed"))
            WebDriverWait(browser, 15).until(lambda b: b.find_element(By.ID, "status").text == "")  # reloaded
            browser.save_screenshot(str(shots / "signed.png"))
            for event in client.watch_events(after_sequence=after, timeout=15):
                if event["type"] == "result_reviewed":
                    break
        finally:
            client.close()
        assert event["job_id"] == site.job_id and event["payload"]["mitotic_count"] == mc
        assert event["payload"]["atypical_count"] == expected["atypical"]
        assert event["payload"]["normal_count"] == expected["normal"]
        assert event["payload"]["reviewer"] == "dr-smith"
        signed = browser.find_element(By.ID, "signed").text
        assert "dr-smith" in signed and f"MC {mc}," in signed and "4 changes" in signed
        # the list follows the event log: a signature made elsewhere shows up without a reload
        browser.get(base + "/")
        WebDriverWait(browser, 10).until(
            lambda b: f"signed, MC {mc}" in b.find_element(By.CSS_SELECTOR, ".review").text)
        browser.execute_script("window.notReloaded = true")
        first_normal = next(i for i, kind in hotspot_ids(site).items() if kind == "normal")
        status, other = sign(site, login(site, REVIEW_TOKEN), [{"decision": "reject", "detection_id": first_normal}])
        assert status == 200
        WebDriverWait(browser, 10).until(
            lambda b: f"signed, MC {other['counts']['mitotic']}" in b.find_element(By.CSS_SELECTOR, ".review").text)
        assert browser.execute_script("return window.notReloaded") is True
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_viewing_writes_nothing_to_the_data_dir(site: Site) -> None:
    cookie = login(site, READ_TOKEN)

    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in site.daemon.data_dir.rglob("*")
                if p.is_file() and not p.name.startswith("store")}

    before = snapshot()
    first = next(iter(hotspot_ids(site)))
    job = f"/jobs/{site.job_id}"
    for path in ("/", job, f"{job}/field.jpg", f"{job}/crops/{first}.png", "/api/jobs", f"{job}/exports/result"):
        assert request(site, "GET", path, headers={"Cookie": cookie})[0] == 200, path
    assert snapshot() == before


def test_get_result_returns_the_review_beside_the_automatic_numbers_and_a_rerun_marks_it_earlier(site: Site) -> None:
    cookie = login(site, REVIEW_TOKEN)
    status, signed = sign(site, cookie, [])
    assert status == 200
    with EdgeClient(site.daemon.server.address, token=READ_TOKEN, insecure=True) as client:
        result = client.get_result(site.job_id)
        assert result["review"]["review_id"] == signed["review_id"] and result["review"]["current"] is True
        assert result["review"]["counts"]["mitotic"] == result["scores"]["hotspot"]["mitotic"]
        rerun = site.daemon.submit_slide(Path(site.store().get_job(site.job_id).slide_path))
        wait_for(lambda: site.store().get_job(rerun.job_id).state == "done", what="the re-run done")
        earlier = client.get_result(site.job_id)["review"]
        assert earlier["current"] is False and earlier["superseded_by"] == rerun.job_id
        assert client.get_result(rerun.job_id)["review"] is None
    _, _, page = request(site, "GET", f"/jobs/{site.job_id}", headers={"Cookie": cookie})
    assert b"Refers to an earlier result" in page
    token_file = site.tmp / "read.token"
    token_file.write_text(READ_TOKEN)
    token_file.chmod(0o600)
    shown = subprocess.run(
        [sys.executable, "-m", "edge", "client", "--server", site.daemon.server.address, "--insecure",
         "--token-file", str(token_file), "get", str(site.job_id)], check=False, capture_output=True, text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "signed review          MC" in shown.stdout and "by dr-smith" in shown.stdout
    assert f"refers to this earlier result (job {rerun.job_id} is newer)" in shown.stdout
    assert "export review_json" in shown.stdout
    assert site.store().get_review(site.job_id).review_id == signed["review_id"]  # kept


def test_calibrate_uses_the_signed_reviews_as_truth(site: Site, tmp_path: Path) -> None:
    from edge.devtools.calibrate import slides_from_reviews
    from edge.engines.manifest import load_bundle

    bundle = load_bundle(site.daemon.config.engines.bundle)
    models = [c.name for c in bundle.classifiers]
    slides = slides_from_reviews(site.store(), models)
    review = site.store().get_review(site.job_id)
    figures = hotspot_ids(site)
    rejected = {c["detection_id"] for c in review.changes if c["decision"] == "reject"}
    added = [c for c in review.changes if c["decision"] == "add"]
    mitotic = {i for i, kind in figures.items() if kind != "non_mitotic"}
    reviewed = next(s for s in slides if s.name.startswith(f"job {site.job_id} "))
    assert len(reviewed.points_um) == len(figures)
    assert len(reviewed.truth_um) == len(mitotic - rejected) + len(added)
    out = subprocess.run(
        [sys.executable, "-m", "edge", "calibrate", "--reviews", str(site.daemon.data_dir), "--out",
         str(tmp_path / "recalibrated"), "--weight-step", "0.5", "--detector-up-to", "0"],
        check=False, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert "signed review(s)" in out.stderr and "wrote      bundle" in out.stdout
    assert (tmp_path / "recalibrated" / "calibration.json").is_file()


def test_mitosis_edge_serve_with_web_serves_the_login_page(tmp_path: Path) -> None:
    import re
    import signal

    from tests.test_daemon import serve

    process = serve(tmp_path, "--web", "127.0.0.1:0")
    try:
        pattern = re.compile(r"review page on http://([\d.]+:\d+)")
        log = tmp_path / "serve.log"
        wait_for(lambda: bool(pattern.findall(log.read_text())), timeout=60, what="the page's address")
        address = pattern.findall(log.read_text())[0]
        conn = http.client.HTTPConnection(address, timeout=10)
        conn.request("GET", "/login")
        response = conn.getresponse()
        assert response.status == 200 and b'name="token"' in response.read()
        conn.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_over_tls_a_listed_client_certificate_signs_and_the_cookie_is_secure(tmp_path: Path, store: Store) -> None:
    import socket
    import ssl

    from edge.config import load_config
    from edge.service.web import start_web
    from tests.tls_certs import TestCA

    ca = TestCA(tmp_path / "ca")
    server, doctor, clerk = (ca.issue("localhost", server=True), ca.issue("dr-cert", server=False),
                             ca.issue("clerk", server=False))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READ_TOKEN} read viewer\n")
    tokens.chmod(0o600)
    config = load_config(None, {
        "server.tls_cert": str(server.cert), "server.tls_key": str(server.key), "server.tls_client_ca": str(ca.ca_path),
        "server.tokens_file": str(tokens), "web.listen": "127.0.0.1:0", "web.review_subjects": ["dr-cert"],
    })
    httpd, thread = start_web(config, store, tmp_path / "results")
    host, port = httpd.server_address[:2]

    def get(path: str, cert: Any = None, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        context = ssl.create_default_context(cafile=str(ca.ca_path))
        if cert is not None:
            context.load_cert_chain(str(cert.cert), str(cert.key))
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        headers = {"Origin": f"https://localhost:{port}", "Host": f"localhost:{port}"}
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.status, dict(response.getheaders()), response.read()
        conn.close()
        return answer

    try:
        idle = socket.create_connection((host, port))  # connects, never says hello: must block nobody
        status, _, page = get("/", doctor)
        assert status == 200 and b"dr-cert (review)" in page
        status, _, page = get("/", clerk)
        assert status == 200 and b"clerk (read)" in page
        assert get("/")[0] == 303  # no certificate, no session: the login form
        status, headers, _ = get("/login", body=b"token=" + READ_TOKEN.encode())
        assert status == 303 and "Secure" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        idle.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_in_the_browser_a_read_only_login_has_no_sign_and_a_forged_cross_site_form_is_refused(site: Site) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, profile = chromium()
    target = f"http://{site.host}/jobs/{site.job_id}/review"
    forged = (f'<!doctype html><form id="f" method="post" action="{target}" enctype="text/plain">'
              '<input name=\'{"changes": [], "result_created_at": 0, "x": "\' value=\'"}\'></form>'
              "<script>document.getElementById('f').submit()</script>").encode()

    class Evil(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(forged)))
            self.end_headers()
            self.wfile.write(forged)

        def log_message(self, *args: Any) -> None:
            pass

    evil = ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://{site.host}"
        browser.get(base + "/login")
        browser.find_element(By.NAME, "token").send_keys(READ_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "jobs"))
        browser.get(f"{base}/jobs/{site.job_id}")
        assert not browser.find_elements(By.ID, "sign")
        assert "signing needs a token with role review" in browser.find_element(By.CSS_SELECTOR, ".readonly").text
        browser.get(f"{base}/jobs/424242")
        assert "404" in browser.find_element(By.TAG_NAME, "h1").text
        assert "job 424242" in browser.find_element(By.TAG_NAME, "main").text
        # a signed-in reviewer visits another site, which posts a review form to the page
        browser.get(base + "/login")
        browser.find_element(By.NAME, "token").send_keys(REVIEW_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "jobs"))
        before = len(site.store().list_reviews())
        browser.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        WebDriverWait(browser, 10).until(lambda b: b.current_url == target)
        assert "cross-site request refused" in browser.page_source
        assert len(site.store().list_reviews()) == before
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
        evil.shutdown()
        evil.server_close()
        thread.join(timeout=5)
