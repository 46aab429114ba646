// The runs page (the queue) and one run's page: live loss curve, speed, ETA, grids, log, exports.

import { draft, get, h, post, toast } from "./api.js";
import { lineChart, smooth } from "./chart.js";

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const file = (id, path, download = false) => `/api/runs/${id}/files/${path}${download ? "?download=1" : ""}`;

export async function runsPage(main, _info, cleanup) {
  const table = h("table", { id: "runs-table" });
  const refresh = async () => {
    const { runs } = await get("/api/runs");
    table.replaceChildren(h("tr", {}, ...["run", "status", "output folder", "started", "ended"].map((t) => h("th", { text: t }))),
      ...runs.map((r) => h("tr", { "data-run": r.id },
        h("td", {}, h("a", { href: `#run/${r.id}`, text: r.id })),
        h("td", {}, h("span", { class: `badge ${r.status}`, text: r.status })),
        h("td", { text: r.output_dir }), h("td", { text: when(r.started) }), h("td", { text: when(r.ended) }))));
    if (!runs.length) table.append(h("tr", {}, h("td", { class: "muted", text: "no runs yet: start one on the Recipe page" })));
  };
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);
  cleanup.push(() => clearInterval(timer));
  main.replaceChildren(h("h2", { text: "Runs" }),
    h("p", { class: "muted", text: "Runs wait in a queue and train one at a time per device, each as its own accelerate launch." }),
    h("div", { class: "panel" }, table));
}

export async function runPage(main, _info, cleanup, id) {
  const rows = [];
  const title = h("h2", { text: `Run ${id}` });
  const badge = h("span", { class: "badge", id: "run-status" });
  const stats = h("span", { id: "run-progress" });
  const chart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  chart.setAttribute("class", "chart");
  chart.id = "loss-chart";
  const grids = h("div", { class: "grids", id: "run-grids" });
  const scores = h("div", { id: "run-scores" });
  const exportsBox = h("div", { id: "run-exports" });
  const card = h("pre", { class: "light", id: "model-card", hidden: true });
  const log = h("pre", { id: "run-log" });
  const steps = h("input", { id: "resume-steps", type: "number", min: 1, style: "width:7rem", title: "train.max_steps for the resumed run" });
  const act = (what, body) => async () => {
    try { await post(`/api/runs/${id}/${what}`, body ? body() : {}); toast(`${what}: ok`); } catch (e) { toast(e.message, true); }
  };
  const stop = h("button", { id: "stop-run", class: "danger", text: "Stop", onclick: act("stop") });
  const resume = h("button", { id: "resume-run", text: "Resume", onclick: act("resume", () => ({ max_steps: Number(steps.value) || null })) });
  const rerun = h("button", { id: "rerun", class: "plain", text: "Re-run with changes", onclick: async () => {
    const data = await get(`/api/runs/${id}/recipe`);
    data.train = data.train || {};
    data.train.output_dir = `${data.train.output_dir || "output/run"}-2`;
    delete data.train.resume;
    draft.save({ base: null, data, parent: id });
    location.hash = "#recipe";
  } });
  main.replaceChildren(title,
    h("div", { class: "row" }, badge, stats),
    h("div", { class: "row" }, stop, resume, h("label", { class: "muted" }, "to max steps ", steps), rerun,
      h("a", { href: `#compare/${id}`, text: "compare" })),
    h("div", { class: "cols" },
      h("div", {}, h("div", { class: "panel" }, h("b", { text: "Loss and learning rate" }), chart),
        h("div", { class: "panel" }, h("b", { text: "Sample grids (prompts x seeds)" }), grids), scores),
      h("div", {}, h("div", { class: "panel" }, h("b", { text: "Exports" }), exportsBox, card),
        h("div", { class: "panel" }, h("b", { text: "Log" }), log))));

  let shownGrids = "";
  let cardShown = false;
  const update = (snap) => {
    if (snap.error) { toast(snap.error, true); return; }
    const r = snap.run;
    title.textContent = `Run ${r.id}`;
    badge.textContent = r.status;
    badge.className = `badge ${r.status}`;
    const active = ["queued", "running", "stopping"].includes(r.status);
    stop.disabled = !active;
    resume.disabled = active || !snap.checkpoints.length;
    if (!steps.value && snap.max_steps) steps.value = snap.max_steps;
    const last = snap.loss.length ? snap.loss[0][0] : null;
    if (last !== null && rows.length && last <= rows[rows.length - 1][0]) rows.splice(rows.findIndex((x) => x[0] >= last));
    rows.push(...snap.loss);
    const p = snap.progress;
    const step = rows.length ? rows[rows.length - 1][0] : 0;
    stats.replaceChildren(
      h("span", { class: "stat" }, "step ", h("b", { id: "run-step", text: `${step}/${snap.max_steps ?? "?"}` })),
      h("span", { class: "stat" }, "speed ", h("b", { text: p?.steps_per_s ? `${p.steps_per_s.toFixed(2)} step/s` : "-" })),
      h("span", { class: "stat" }, "ETA ", h("b", { text: active && p ? p.eta : "-" })),
      h("span", { class: "stat" }, "loss ", h("b", { text: rows.length ? rows[rows.length - 1][1].toFixed(4) : "-" })));
    const pts = rows.map((x) => [x[0], x[1]]);
    lineChart(chart, [
      { name: "loss", points: pts, color: "#9bb7d4", width: 1, log: true },
      { name: "loss (moving average)", points: smooth(pts, Math.max(1, Math.floor(pts.length / 20))), color: "#1f4e79", log: true },
      { name: "learning rate", points: rows.map((x) => [x[0], x[2]]), color: "#c55a11", axis: "right" },
    ]);
    const gkey = JSON.stringify(snap.grids);
    if (gkey !== shownGrids) {
      shownGrids = gkey;
      grids.replaceChildren(...snap.grids.map((g) => h("figure", { "data-step": g.step },
        h("img", { src: `${file(id, g.file)}?t=${Date.now()}`, alt: `step ${g.step}` }), h("figcaption", { text: `step ${g.step}` }))));
    }
    const sc = Object.entries(snap.scores);
    scores.replaceChildren(...(sc.length ? [h("div", { class: "panel" }, h("b", { text: "Toy scorer: subject similarity" }),
      h("table", {}, h("tr", {}, h("th", { text: "step" }), ...Object.keys(sc[0][1]).map((k) => h("th", { text: k }))),
        ...sc.map(([s, v]) => h("tr", {}, h("td", { text: s }), ...Object.values(v).map((x) => h("td", { text: x.toFixed(3) }))))))] : []));
    exportsBox.replaceChildren(snap.exports.length ? h("ul", {}, ...snap.exports.map((e) => h("li", {},
      h("a", { href: file(id, e.file, true), "data-export": e.file, text: e.file }),
      h("span", { class: "muted", text: ` ${(e.bytes / 1024).toFixed(1)} KiB` })))) : h("div", { class: "muted", text: "nothing exported yet" }),
      h("div", { class: "muted", text: `checkpoints: ${snap.checkpoints.join(", ") || "none"}` }));
    if (!cardShown && snap.exports.some((e) => e.file === "README.md")) {
      cardShown = true;
      fetch(file(id, "README.md")).then((res) => res.text()).then((t) => { card.textContent = t; card.hidden = false; });
    }
    log.textContent = snap.log.join("\n");
    log.scrollTop = log.scrollHeight;
  };

  update(await get(`/api/runs/${id}`));
  rows.length = 0;
  const source = new EventSource(`/api/runs/${id}/events`);
  source.addEventListener("snapshot", (e) => update(JSON.parse(e.data)));
  cleanup.push(() => source.close());
}
