// The recipe form, drawn from the server's description of the typed schema (/api/form).
// `data` is the recipe as YAML would hold it: a key that is absent takes the schema's default, shown
// as a placeholder. Every input carries its dotted key (data-key) so errors land beside their field.

import { h } from "./api.js";

const show = (v) => (v === null || v === undefined ? "null" : Array.isArray(v) ? v.join(", ") : String(v));

function getAt(obj, path) {
  return path.reduce((o, k) => (o === undefined || o === null ? undefined : o[k]), obj);
}

function setAt(obj, path, value) {
  let node = obj;
  path.slice(0, -1).forEach((k, i) => {
    if (node[k] === undefined || node[k] === null || typeof node[k] !== "object") {
      node[k] = typeof path[i + 1] === "number" ? [] : {};
    }
    node = node[k];
  });
  const last = path[path.length - 1];
  if (value === undefined) {
    if (Array.isArray(node)) return;
    delete node[last];
  } else node[last] = value;
}

// What the user typed -> the value the recipe holds (undefined: fall back to the default).
function parse(kind, text) {
  const t = text.trim();
  if (t === "") return undefined;
  if (t === "null") return null;
  if (kind === "int" || kind === "float") {
    const n = Number(t);
    return Number.isFinite(n) && (kind === "float" || Number.isInteger(n)) ? n : t; // bad input: let the schema say so
  }
  if (kind === "bool") return t === "true" ? true : t === "false" ? false : t;
  if (kind === "lines") return text.split("\n").map((s) => s.trim()).filter(Boolean);
  if (kind === "numbers") return t.split(/[\s,]+/).filter(Boolean).map((s) => (Number.isInteger(Number(s)) ? Number(s) : s));
  if (kind === "value") {
    try { return JSON.parse(t); } catch { /* not JSON */ }
    return t.includes(",") ? t.split(",").map((s) => s.trim()).filter(Boolean) : t;
  }
  return text;
}

export class RecipeForm {
  constructor(container, spec, data, onChange) {
    Object.assign(this, { container, spec, data, onChange });
  }

  render() {
    this.container.replaceChildren(...this.spec.map((s) => this.node(s, [s.key])));
  }

  changed(path, value, rerender = false) {
    setAt(this.data, path, value);
    if (rerender) this.render();
    this.onChange(this.data);
  }

  node(s, path) {
    if (s.kind === "group") return this.group(s, path);
    if (s.kind === "union") return this.union(s, path);
    if (s.kind === "list") return this.list(s, path);
    return this.scalar(s, path);
  }

  group(s, path) {
    const value = getAt(this.data, path);
    const box = h("fieldset", { "data-key": path.join(".") }, h("legend", { title: s.help, text: path.at(-1) }));
    if (s.nullable) {
      const on = value !== undefined && value !== null;
      box.append(h("div", { class: "row" },
        h("label", {}, h("input", { type: "checkbox", checked: on, "data-toggle": path.join("."),
          onchange: (e) => this.changed(path, e.target.checked ? {} : undefined, true) }), " set"),
        h("span", { class: "muted", text: s.help })));
      if (!on) return box;
    }
    box.append(h("div", { class: "error", "data-error": path.join(".") }));
    for (const f of s.fields) box.append(this.node(f, [...path, f.key]));
    return box;
  }

  union(s, path, item = false) {
    const value = getAt(this.data, path) || {};
    const tags = Object.keys(s.options);
    const tag = value[s.tag] ?? tags[0];
    const key = path.join(".");
    const select = h("select", { "data-key": `${key}.${s.tag}`, onchange: (e) => {
      const keep = {}; keep[s.tag] = e.target.value;
      this.changed(path, keep, true);
    } }, ...tags.map((t) => h("option", { value: t, selected: t === tag, text: t })));
    const box = h("fieldset", { "data-key": key },
      h("legend", { text: item ? `${path.at(-2)} ${path.at(-1)}` : path.at(-1) }),
      h("div", { class: "field" }, h("label", { text: s.tag }), select, h("div", { class: "help", text: s.help }),
        h("div", { class: "error", "data-error": `${key}.${s.tag}` })),
      h("div", { class: "error", "data-error": key }));
    for (const f of s.options[tag] || []) box.append(this.node(f, [...path, f.key]));
    return box;
  }

  list(s, path) {
    const items = getAt(this.data, path) || [];
    const box = h("fieldset", { "data-key": path.join(".") }, h("legend", { title: s.help, text: path.at(-1) }),
      h("div", { class: "error", "data-error": path.join(".") }));
    items.forEach((_, i) => {
      const item = this.union(s.item, [...path, i], true);
      item.append(h("button", { class: "plain", type: "button", text: "remove", onclick: () => {
        items.splice(i, 1); this.changed(path, items, true);
      } }));
      box.append(item);
    });
    box.append(h("button", { class: "plain", type: "button", "data-add": path.join("."), text: `add ${path.at(-1)}`,
      onclick: () => {
        const first = {}; first[s.item.tag] = Object.keys(s.item.options)[0];
        this.changed(path, [...items, first], true);
      } }));
    return box;
  }

  scalar(s, path) {
    const key = path.join(".");
    const value = getAt(this.data, path);
    const isSet = value !== undefined;
    const dflt = s.default === undefined ? "" : `default: ${show(s.default)}`;
    const placeholder = s.required ? "required" : dflt;
    let input;
    const onInput = (e) => this.changed(path, parse(s.kind, e.target.value));
    if (s.kind === "choice" || s.kind === "bool") {
      const options = s.kind === "bool" ? [true, false] : s.choices;
      input = h("select", { onchange: onInput },
        h("option", { value: "", text: `(${placeholder || "unset"})` }),
        ...(s.nullable ? [h("option", { value: "null", selected: value === null, text: "null" })] : []),
        ...options.map((c) => h("option", { value: String(c), selected: isSet && value === c, text: String(c) })));
    } else if (s.kind === "multi") {
      const chosen = new Set(isSet && Array.isArray(value) ? value : []);
      input = h("span", {}, ...s.choices.map((c) => h("label", { class: "muted" },
        h("input", { type: "checkbox", checked: chosen.has(c), onchange: (e) => {
          e.target.checked ? chosen.add(c) : chosen.delete(c);
          this.changed(path, [...chosen]);
        } }), ` ${c} `)), h("span", { class: "muted", text: isSet ? "" : ` (${dflt})` }));
    } else if (s.kind === "lines") {
      input = h("textarea", { rows: 3, placeholder, oninput: onInput });
      input.value = isSet && Array.isArray(value) ? value.join("\n") : isSet ? show(value) : "";
    } else {
      input = h("input", { type: "text", placeholder, oninput: onInput, spellcheck: "false" });
      input.value = isSet ? (s.kind === "value" && typeof value === "object" && value ? JSON.stringify(value) : show(value)) : "";
    }
    input.dataset.key = key;
    return h("div", { class: `field${isSet ? " set" : ""}`, "data-field": key },
      h("label", { title: key, text: s.key }), input,
      h("div", { class: "help", text: s.help }),
      h("div", { class: "error", "data-error": key }));
  }

  // errors: [{key, message}] -> beside their field (or the nearest enclosing one); returns the unplaced ones
  showErrors(errors) {
    this.container.querySelectorAll("[data-error]").forEach((e) => { e.textContent = ""; });
    this.container.querySelectorAll(".field.invalid").forEach((e) => e.classList.remove("invalid"));
    const loose = [];
    for (const err of errors) {
      let parts = err.key ? err.key.split(".") : [];
      let spot = null;
      while (parts.length && !spot) {
        spot = this.container.querySelector(`[data-error="${CSS.escape(parts.join("."))}"]`);
        parts = parts.slice(0, -1);
      }
      if (!spot) { loose.push(err); continue; }
      spot.textContent = (spot.textContent ? spot.textContent + "\n" : "") + err.message;
      spot.closest(".field")?.classList.add("invalid");
    }
    return loose;
  }
}
