// The page router: #data, #recipe, #runs, #run/<id>, #compare.

import { get, toast } from "./api.js";
import { comparePage } from "./compare.js";
import { dataPage } from "./data.js";
import { recipePage } from "./recipe.js";
import { runPage, runsPage } from "./runs.js";

const PAGES = { data: dataPage, recipe: recipePage, runs: runsPage, run: runPage, compare: comparePage };
let info = null;
let cleanup = [];

async function route() {
  cleanup.forEach((f) => f());
  cleanup = [];
  const [name, arg] = (location.hash.slice(1).split("?")[0] || "data").split("/");
  const page = PAGES[name] || dataPage;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active",
    a.id === `nav-${name === "run" ? "runs" : name}`));
  const main = document.getElementById("page");
  main.dataset.page = name;
  main.dataset.ready = "";
  try {
    info = info || (await get("/api/info"));
    document.getElementById("root-name").textContent = `root: ${info.root}`;
    await page(main, info, cleanup, arg ? decodeURIComponent(arg) : undefined);
    main.dataset.ready = name;
  } catch (e) {
    toast(e.message, true);
  }
}

window.addEventListener("hashchange", route);
route();
