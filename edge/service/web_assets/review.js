// mitosis-edge review page: live job states, keyboard-first review, sign. No framework, no CDN.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  // --- job list: states and numbers follow the event log (a long poll of /api/events) ---
  const table = document.getElementById("jobs");
  if (table) {
    const refresh = async () => {
      const r = await fetch("/api/jobs" + location.search, {credentials: "same-origin"});
      if (!r.ok) return;
      const rows = (await r.json()).jobs;
      const shown = new Set([...table.querySelectorAll("tr[data-job]")].map((tr) => tr.dataset.job));
      if (rows.some((j) => !shown.has(String(j.job_id)))) { location.reload(); return; }
      for (const j of rows) {
        const tr = table.querySelector(`tr[data-job="${j.job_id}"]`);
        if (!tr) continue;
        const st = tr.querySelector(".state");
        st.textContent = j.state; st.className = "state state-" + j.state;
        for (const k of ["mc", "ratio", "qc", "review"]) tr.querySelector("." + k).textContent = j[k];
      }
    };
    const follow = async (after) => {
      try {
        const r = await fetch(`/api/events?after=${after}`, {credentials: "same-origin"});
        if (!r.ok) throw new Error(String(r.status));
        const ev = await r.json();
        if (after >= 0 && ev.jobs.length) await refresh();
        setTimeout(() => follow(ev.last_sequence), ev.last_sequence === after ? 2000 : 0);
      } catch (e) { setTimeout(() => follow(after), 5000); }  /* the daemon restarting: try again */
    };
    follow(-1);
  }

  // --- slide page ---
  const sign = document.getElementById("sign");
  const gallery = document.getElementById("gallery");
  if (!gallery) return;
  const figs = [...gallery.querySelectorAll(".fig")];
  const field = document.getElementById("field");
  const decisions = new Map();  // detection id -> confirm | reject | normal | atypical
  const added = [];             // {x_px, y_px, subtype, el}
  let current = 0;
  const MITOTIC = ["normal", "atypical", "uncertain"];

  const finalClass = (model, d) => (!d || d === "confirm") ? model : (d === "reject" ? "non_mitotic" : d);
  const marker = (id) => field && field.querySelector(`.marker[data-id="${id}"]`);

  function tally() {
    const classes = figs.map((f) => finalClass(f.dataset.class, decisions.get(f.dataset.id)));
    for (const a of added) classes.push(a.subtype);
    const n = (k) => classes.filter((c) => c === k).length;
    const normal = n("normal"), atyp = n("atypical"), unc = n("uncertain");
    document.getElementById("rev-mc").textContent = normal + atyp + unc;
    document.getElementById("rev-amf").textContent = atyp;
    document.getElementById("rev-nmf").textContent = normal;
    document.getElementById("rev-ratio").textContent = normal ? (atyp / normal).toFixed(2) : "–";
    document.getElementById("changes").textContent = decisions.size + added.length;
  }

  function show(fig) {
    const d = decisions.get(fig.dataset.id);
    const now = finalClass(fig.dataset.class, d);
    fig.querySelector(".decision").textContent = d ? " → " + (d === "confirm" ? "confirmed" : d === "reject" ? "rejected" : d) : "";
    fig.dataset.decision = d || "";
    const m = marker(fig.dataset.id);
    if (m) m.className = "marker m-" + now + (d ? " decided" : "");
  }

  function focus(i, scroll = true) {
    if (!figs.length) return;
    current = (i + figs.length) % figs.length;
    figs.forEach((f) => f.classList.remove("current"));
    field && field.querySelectorAll(".marker.current").forEach((m) => m.classList.remove("current"));
    const fig = figs[current];
    fig.classList.add("current");
    fig.focus({preventScroll: !scroll});
    const m = marker(fig.dataset.id);
    if (m) m.classList.add("current");
  }

  function decide(d) {
    const fig = figs[current];
    if (!fig) return;
    if (d === null) decisions.delete(fig.dataset.id); else decisions.set(fig.dataset.id, d);
    show(fig); tally();
    if (d !== null) focus(current + 1);
  }

  figs.forEach((f, i) => f.addEventListener("click", () => focus(i)));
  if (field) {
    // positions through the CSSOM: the page's Content-Security-Policy allows no inline style attribute
    field.querySelectorAll(".marker").forEach((m) => { m.style.left = m.dataset.left + "%"; m.style.top = m.dataset.top + "%"; });
    field.querySelectorAll(".marker").forEach((m) => m.addEventListener("click", (ev) => {
      ev.stopPropagation();
      const i = figs.findIndex((f) => f.dataset.id === m.dataset.id);
      if (i >= 0) focus(i);
    }));
    field.addEventListener("click", (ev) => {
      const img = field.querySelector("img");
      const box = img.getBoundingClientRect();
      const fx = (ev.clientX - box.left) / box.width, fy = (ev.clientY - box.top) / box.height;
      if (fx < 0 || fy < 0 || fx > 1 || fy > 1) return;
      const x0 = +field.dataset.x0, y0 = +field.dataset.y0, x1 = +field.dataset.x1, y1 = +field.dataset.y1;
      const a = {x_px: x0 + fx * (x1 - x0), y_px: y0 + fy * (y1 - y0), subtype: "normal"};
      a.el = document.createElement("button");
      a.el.className = "marker m-normal added";
      a.el.title = "added by you (a: atypical, n: normal, Delete: remove)";
      a.el.style.left = (fx * 100).toFixed(3) + "%"; a.el.style.top = (fy * 100).toFixed(3) + "%";
      a.el.addEventListener("click", (e) => { e.stopPropagation(); selectAdded(a); });
      field.appendChild(a.el);
      added.push(a);
      selectAdded(a);
      tally();
    });
  }
  let selected = null;
  function selectAdded(a) {
    added.forEach((x) => x.el.classList.remove("current"));
    selected = a; if (a) { a.el.classList.add("current"); a.el.focus(); }
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.target.tagName === "INPUT") return;
    const k = ev.key;
    if (selected && document.activeElement === selected.el) {
      if (k === "a" || k === "n" || k === "u") {
        selected.subtype = {a: "atypical", n: "normal", u: "uncertain"}[k];
        selected.el.className = "marker added current m-" + selected.subtype; tally(); ev.preventDefault(); return;
      }
      if (k === "Delete" || k === "Backspace") {
        selected.el.remove(); added.splice(added.indexOf(selected), 1); selected = null; tally(); ev.preventDefault(); return;
      }
    }
    const act = {j: () => focus(current + 1), ArrowRight: () => focus(current + 1), k: () => focus(current - 1),
      ArrowLeft: () => focus(current - 1), c: () => decide("confirm"), r: () => decide("reject"), x: () => decide("reject"),
      n: () => decide("normal"), a: () => decide("atypical"), u: () => decide(null)}[k];
    if (act) { selectAdded(null); act(); ev.preventDefault(); }
  });

  if (sign) {
    sign.addEventListener("click", async () => {
      const status = document.getElementById("status");
      const changes = [...decisions].map(([id, d]) => ({decision: d, detection_id: +id}));
      for (const a of added) changes.push({decision: "add", x_px: a.x_px, y_px: a.y_px, subtype: a.subtype});
      sign.disabled = true; status.textContent = "Signing…";
      try {
        const r = await fetch(`/jobs/${sign.dataset.job}/review`, {
          method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf},
          body: JSON.stringify({changes, result_created_at: +sign.dataset.created}),
        });
        const body = await r.json();
        if (!r.ok) { status.textContent = "Not signed: " + body.error; sign.disabled = false; return; }
        status.textContent = `Signed: MC ${body.counts.mitotic}, AMF ${body.counts.atypical}, NMF ${body.counts.normal}.`;
        setTimeout(() => location.reload(), 600);
      } catch (e) { status.textContent = "Not signed: " + e; sign.disabled = false; }
    });
  }
  if (figs.length) focus(0, false);  // the page opens at its top: numbers, field, then the gallery
  tally();
})();
