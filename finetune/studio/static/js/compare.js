// The compare page: two grids side by side (two steps of one run, or two runs) and the scores over steps.

import { get, h, q } from "./api.js";
import { lineChart } from "./chart.js";

const COLORS = ["#1f4e79", "#c55a11", "#2e7d32", "#8e24aa", "#00838f", "#ad1457"];

export async function comparePage(main, _info, _cleanup, first) {
  const { runs } = await get("/api/runs");
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const sides = [0, 1].map((i) => ({ run: params.get(`run${i}`) || first || runs[0]?.id, step: params.get(`step${i}`) }));
  const snaps = {};
  for (const s of sides) if (s.run && !snaps[s.run]) snaps[s.run] = await get(`/api/runs/${s.run}`);
  for (const [i, s] of sides.entries()) {
    const g = snaps[s.run]?.grids || [];
    if (!s.step && g.length) s.step = String(i === 0 ? g[0].step : g[g.length - 1].step);
  }
  const reload = () => {
    const p = {};
    sides.forEach((s, i) => { p[`run${i}`] = s.run; p[`step${i}`] = s.step; });
    location.hash = `#compare?${q(p)}`;
  };
  const column = (s, i) => {
    const snap = snaps[s.run];
    const pickRun = h("select", { id: `cmp-run-${i}`, onchange: (e) => { s.run = e.target.value; s.step = null; reload(); } },
      ...runs.map((r) => h("option", { value: r.id, selected: r.id === s.run, text: r.id })));
    const pickStep = h("select", { id: `cmp-step-${i}`, onchange: (e) => { s.step = e.target.value; reload(); } },
      ...(snap?.grids || []).map((g) => h("option", { value: g.step, selected: String(g.step) === s.step, text: `step ${g.step}` })));
    const grid = snap?.grids.find((g) => String(g.step) === s.step);
    return h("div", { class: "panel" }, h("div", { class: "row" }, pickRun, pickStep),
      grid ? h("img", { id: `cmp-img-${i}`, src: `/api/runs/${s.run}/files/${grid.file}`, alt: `${s.run} step ${s.step}` })
        : h("div", { class: "muted", text: "no grid yet" }));
  };
  const [a, b] = sides.map((s) => snaps[s.run]?.validation);
  const same = a && b && JSON.stringify(a) === JSON.stringify(b);
  const note = h("div", { id: "cmp-same", class: same ? "muted" : "error",
    text: !a || !b ? "" : same ? `same prompts and seeds: ${a.prompts.join(" | ")} x seeds ${a.seeds.join(", ")}`
      : "these runs render different prompts or seeds: the grids are not like for like" });
  const chart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  chart.setAttribute("class", "chart");
  chart.id = "score-chart";
  main.replaceChildren(h("h2", { text: "Compare" }), note,
    runs.length ? h("div", { class: "compare" }, ...sides.map(column)) : h("div", { class: "muted", text: "no runs yet" }),
    h("div", { class: "panel" }, h("b", { text: "Toy scorer over steps (subject similarity per prompt)" }), chart));
  const series = [];
  Object.entries(snaps).forEach(([run, snap]) => {
    const steps = Object.keys(snap.scores).map(Number).sort((x, y) => x - y);
    const prompts = steps.length ? Object.keys(snap.scores[String(steps[0])]) : [];
    prompts.forEach((p) => series.push({ name: `${run}: ${p}`, color: COLORS[series.length % COLORS.length],
      points: steps.map((st) => [st, snap.scores[String(st)][p]]) }));
  });
  lineChart(chart, series);
}
