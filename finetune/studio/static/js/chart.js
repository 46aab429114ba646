// A small SVG line chart: several series, an optional second y axis, optional log scale.

const NS = "http://www.w3.org/2000/svg";

function el(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function scale(values, log) {
  const finite = values.filter((v) => Number.isFinite(v) && (!log || v > 0));
  if (!finite.length) return null;
  let lo = Math.min(...finite), hi = Math.max(...finite);
  if (log) { lo = Math.log10(lo); hi = Math.log10(hi); }
  if (hi === lo) { hi += 0.5; lo -= 0.5; }
  return { lo, hi, log };
}

function fmt(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-2 || a >= 1e4) ? v.toExponential(1) : Number(v.toPrecision(3)).toString();
}

// series: [{name, points: [[x, y], ...], color, axis: "left" | "right", log}]
export function lineChart(svg, series, { xLabel = "step" } = {}) {
  const W = svg.clientWidth || 600, H = svg.clientHeight || 240;
  const pad = { l: 52, r: 52, t: 10, b: 26 };
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  if (!xs.length) {
    svg.append(Object.assign(el("text", { x: W / 2 - 30, y: H / 2 }), { textContent: "no data yet" }));
    return;
  }
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
  const axes = {};
  for (const side of ["left", "right"]) {
    const mine = series.filter((s) => (s.axis || "left") === side);
    if (mine.length) axes[side] = scale(mine.flatMap((s) => s.points.map((p) => p[1])), mine[0].log);
  }
  const Y = (side, v) => {
    const a = axes[side];
    const t = ((a.log ? Math.log10(v) : v) - a.lo) / (a.hi - a.lo);
    return H - pad.b - t * (H - pad.t - pad.b);
  };
  svg.append(el("line", { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, stroke: "#ccc" }));
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + ((x1 - x0) * i) / 4;
    svg.append(Object.assign(el("text", { x: X(xv) - 8, y: H - 8 }), { textContent: Math.round(xv) }));
  }
  svg.append(Object.assign(el("text", { x: W / 2, y: H - 1 }), { textContent: xLabel }));
  for (const [side, a] of Object.entries(axes)) {
    if (!a) continue;
    for (let i = 0; i <= 3; i++) {
      const raw = a.lo + ((a.hi - a.lo) * i) / 3;
      const v = a.log ? 10 ** raw : raw;
      const y = Y(side, v);
      const x = side === "left" ? 2 : W - pad.r + 4;
      svg.append(Object.assign(el("text", { x, y: y + 3 }), { textContent: fmt(v) }));
      if (side === "left") svg.append(el("line", { x1: pad.l, y1: y, x2: W - pad.r, y2: y, stroke: "#eef0f3" }));
    }
  }
  series.forEach((s, i) => {
    const side = s.axis || "left";
    const pts = s.points.filter((p) => Number.isFinite(p[1]) && (!axes[side]?.log || p[1] > 0));
    if (!pts.length || !axes[side]) return;
    const d = pts.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(side, p[1]).toFixed(1)}`).join("");
    svg.append(el("path", { d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.5,
                            "data-series": s.name }));
    svg.append(Object.assign(el("text", { x: pad.l + 6 + i * 130, y: pad.t + 10, fill: s.color }),
                             { textContent: s.name }));
  });
}

// Moving average: the loss of single steps is noisy.
export function smooth(points, window) {
  const out = [];
  let sum = 0;
  for (let i = 0; i < points.length; i++) {
    sum += points[i][1];
    if (i >= window) sum -= points[i - window][1];
    out.push([points[i][0], sum / Math.min(i + 1, window)]);
  }
  return out;
}
