// Talking to the studio server. Every write carries X-Studio: 1 (the server refuses writes without it).

export class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.errors = body.errors || [];
  }
}

async function request(method, url, body) {
  const init = { method, headers: {} };
  if (method !== "GET") init.headers["X-Studio"] = "1";
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(url, init);
  const data = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

export const get = (url) => request("GET", url);
export const post = (url, body) => request("POST", url, body ?? {});
export const put = (url, body) => request("PUT", url, body ?? {});

export function q(params) {
  return new URLSearchParams(params).toString();
}

export function toast(text, bad = false) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.className = bad ? "bad" : "";
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 3000);
}

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// The recipe being edited, shared by the data and recipe pages and kept across reloads.
export const draft = {
  load() {
    try { return JSON.parse(sessionStorage.getItem("finetune.draft") || "null"); } catch { return null; }
  },
  save(state) { sessionStorage.setItem("finetune.draft", JSON.stringify(state)); },
  // the draft, started from a shipped recipe (the toy LoRA when there is one) the first time
  async ensure(info) {
    let state = this.load();
    if (!state || !state.data) {
      const base = info.recipes.includes("toy/lora.yaml") ? "toy/lora.yaml" : info.recipes[0];
      state = { base, data: await get(`/api/recipes/${base}`), parent: null };
      this.save(state);
    }
    return state;
  },
};
