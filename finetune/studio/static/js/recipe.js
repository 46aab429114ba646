// The recipe page: a shipped recipe as the start, the form, the CLI's errors beside each field, the YAML,
// the data check, and the button that queues the run.

import { ApiError, draft, get, h, post, toast } from "./api.js";
import { RecipeForm } from "./form.js";

let spec = null;

export async function recipePage(main, info) {
  spec = spec || (await get("/api/form")).fields;
  const state = await draft.ensure(info);
  const formBox = h("div", { id: "recipe-form" });
  const loose = h("div", { class: "error", id: "recipe-errors" });
  const yaml = h("pre", { id: "recipe-yaml", class: "light" });
  const download = h("a", { id: "recipe-download", download: "recipe.yaml", href: "#", text: "download recipe.yaml" });
  const status = h("span", { id: "recipe-status", class: "muted" });
  const summary = h("pre", { id: "check-summary", class: "light", hidden: true });
  const estimate = h("pre", { id: "estimate-output", class: "light", hidden: true });
  const name = h("input", { id: "run-name", placeholder: "run name (default: the output folder)" });
  const config = h("select", { id: "run-accelerate" }, h("option", { value: "", text: "one process (accelerate default)" }),
    ...info.accelerate_configs.map((c) => h("option", { value: c, text: `accelerate: ${c}` })));
  const pick = h("select", { id: "recipe-base" }, ...info.recipes.map((r) => h("option", { value: r, selected: r === state.base, text: r })));

  let timer = null;
  let form = null;
  const validate = async () => {
    const res = await post("/api/recipe/validate", { data: state.data });
    show(res.errors, res.yaml);
  };
  const show = (errors, text) => {
    const left = form.showErrors(errors);
    loose.textContent = left.map((e) => e.message).join("\n");
    status.textContent = errors.length ? `${errors.length} problem(s)` : "valid";
    status.className = errors.length ? "error" : "muted";
    if (text !== undefined) {
      yaml.textContent = text;
      URL.revokeObjectURL(download.href);
      download.href = URL.createObjectURL(new Blob([text], { type: "application/x-yaml" }));
    }
  };
  const changed = () => {
    draft.save(state);
    clearTimeout(timer);
    timer = setTimeout(validate, 250);
  };
  form = new RecipeForm(formBox, spec, state.data, changed);
  form.render();

  pick.onchange = async () => {
    state.base = pick.value;
    state.data = await get(`/api/recipes/${pick.value}`);
    state.parent = null;
    form.data = state.data;
    form.render();
    changed();
  };

  const check = h("button", { id: "check-data", class: "plain", text: "Check data", onclick: async () => {
    summary.hidden = false;
    summary.textContent = "scanning...";
    const res = await post("/api/recipe/check", { data: state.data });
    summary.textContent = res.summary || res.errors.map((e) => e.message).join("\n");
  } });
  const estimateButton = info.features.estimate ? h("button", { id: "estimate", class: "plain", text: "Estimate memory and time",
    onclick: async () => {
      estimate.hidden = false;
      estimate.textContent = "estimating...";
      const res = await post("/api/recipe/estimate", { data: state.data });
      estimate.textContent = res.estimate || res.errors.map((e) => e.message).join("\n");
    } }) : null;
  const start = h("button", { id: "start-run", text: "Start run", onclick: async () => {
    start.disabled = true;
    try {
      const run = await post("/api/runs", { data: state.data, name: name.value, accelerate_config: config.value,
        parent: state.parent });
      toast(`queued run ${run.id}`);
      location.hash = `#run/${run.id}`;
    } catch (e) {
      if (e instanceof ApiError && e.errors.length) show(e.errors);
      toast(e.message, true);
    } finally { start.disabled = false; }
  } });

  main.replaceChildren(h("h2", { text: "Recipe" }), h("div", { class: "cols" },
    h("div", {}, h("div", { class: "row" }, h("span", { text: "start from" }), pick,
      state.parent ? h("span", { class: "muted", text: `re-run of ${state.parent}` }) : null), formBox),
    h("div", { class: "side" },
      h("div", { class: "panel" }, h("div", { class: "row" }, h("b", { text: "Validation" }), status), loose),
      h("div", { class: "panel" }, h("div", { class: "row" }, name, config, start),
        h("div", { class: "row" }, check, estimateButton), summary, estimate),
      h("div", { class: "panel" }, h("div", { class: "row" }, h("b", { text: "recipe.yaml" }), download), yaml))));
  await validate();
}
