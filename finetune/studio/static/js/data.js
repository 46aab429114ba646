// The data page: pick a folder under the root, see every image with its caption, edit captions in place,
// and see what training would make of the folder (buckets, problems, caption statistics).

import { draft, get, h, post, put, q, toast } from "./api.js";

let current = "";

export async function dataPage(main, info) {
  const state = await draft.ensure(info);
  const src = state.data?.data?.sources?.find((s) => s.type === "folder");
  current = current || src?.path || "";
  const listing = await get(`/api/data/folders?${q({ path: current })}`);
  const folder = await get(`/api/data/images?${q({ path: current })}`);
  const res = state.data?.data?.resolution || 512;
  const buckets = state.data?.data?.buckets?.enabled ?? true;

  const crumbs = h("div", { class: "row", id: "data-crumbs" },
    h("a", { href: "#data", text: info.root, onclick: (e) => { e.preventDefault(); go(main, info, ""); } }),
    ...(current ? current.split("/").map((part, i, all) => [" / ", h("a", { href: "#data", text: part,
      onclick: (e) => { e.preventDefault(); go(main, info, all.slice(0, i + 1).join("/")); } })]) : []));
  const subs = h("div", { class: "row", id: "data-folders" }, ...listing.folders.map((f) =>
    h("button", { class: "plain", "data-folder": f.path, text: `${f.name} (${f.images})`,
      onclick: () => go(main, info, f.path) })));
  const scanBox = h("div", { id: "scan-result" });
  const gallery = h("div", { class: "gallery", id: "gallery" }, ...folder.images.map((im) => tile(im)));
  const use = h("button", { id: "use-folder", text: "Use this folder in the recipe", disabled: !folder.images.length,
    onclick: async () => {
      const s = await draft.ensure(info);
      s.data.data = s.data.data || {};
      // the folder replaces the instance sources; preservation sources (preserve: true) stay, as the
      // recipe's data.preservation needs them
      const kept = (s.data.data.sources || []).filter((src) => src && src.preserve);
      s.data.data.sources = [{ type: "folder", path: current }, ...kept];
      draft.save(s);
      toast(kept.length ? `data.sources: the folder ${current}, and ${kept.length} preservation source(s) kept`
        : `data.sources is now the folder ${current}`);
    } });
  const resInput = h("input", { id: "scan-resolution", type: "number", min: 64, step: 64, value: res, style: "width:5.5rem",
    title: "data.resolution: the bucket plan and the size checks depend on it" });
  const scan = h("button", { id: "scan-folder", class: "plain", text: "Scan", disabled: !folder.images.length,
    onclick: () => runScan(scanBox, Number(resInput.value) || 512, buckets) });
  const upload = h("input", { type: "file", id: "upload", multiple: true, accept: "image/*,.txt,.caption", onchange: async (e) => {
    // images first: a caption is accepted only beside its image
    const isCaption = (f) => /\.(txt|caption)$/i.test(f.name);
    for (const file of [...e.target.files].sort((a, b) => isCaption(a) - isCaption(b))) {
      const r = await fetch(`/api/data/upload?${q({ folder: current, name: file.name })}`,
        { method: "PUT", headers: { "X-Studio": "1" }, body: file });
      const body = await r.json();
      if (!r.ok) toast(`${file.name}: ${body.error}`, true);
    }
    go(main, info, current);
  } });
  const caption = info.features.caption ? h("button", { id: "auto-caption", class: "plain", text: "Auto-caption",
    title: "caption images that have no caption yet (tools/caption.py)", onclick: () => autoCaption(main, info) }) : null;

  main.replaceChildren(...[h("h2", { text: "Data" }), crumbs, subs,
    h("div", { class: "row" }, use, h("label", { class: "muted" }, "resolution ", resInput), scan, caption, h("label", { class: "muted" }, "upload ", upload),
      h("span", { class: "muted", text: `${folder.images.length} images; captions are saved to .txt files beside them` })),
    folder.outside_root.length ? h("div", { class: "error", text: `not shown (links out of the root): ${folder.outside_root.join(", ")}` }) : null,
    scanBox, gallery].filter(Boolean));
  if (folder.images.length) runScan(scanBox, res, buckets);
}

function go(main, info, path) {
  current = path;
  dataPage(main, info).catch((e) => toast(e.message, true));
}

function tile(im) {
  const text = h("textarea", { "data-image": im.path, placeholder: "no caption yet" });
  text.value = im.caption.trim();
  const box = h("div", { class: `tile${im.has_caption ? "" : " missing"}`, "data-tile": im.path },
    h("img", { src: `/api/data/image?${q({ path: im.path, size: 256 })}`, alt: im.name, loading: "lazy" }),
    h("div", { class: "name", title: im.path, text: im.name }), text);
  const save = async () => {
    if (text.value.trim() === im.caption.trim()) return;
    try {
      await put("/api/data/caption", { path: im.path, caption: text.value });
      im.caption = text.value;
      box.classList.remove("missing");
      box.classList.add("saved");
    } catch (e) { toast(e.message, true); }
  };
  text.addEventListener("change", save);
  text.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) save(); });
  return box;
}

async function runScan(box, resolution, buckets) {
  box.replaceChildren(h("div", { class: "muted", text: "scanning..." }));
  try {
    const s = await post("/api/data/scan", { path: current, resolution, buckets });
    const st = s.stats;
    const problems = [...s.skipped, ...s.notes, ...s.duplicates.map((g) => `identical images: ${g.join(", ")}`)];
    box.replaceChildren(h("div", { class: "cols" },
      h("div", { class: "panel", id: "scan-stats" },
        h("div", {}, h("span", { class: "stat" }, "images ", h("b", { text: s.images })),
          h("span", { class: "stat" }, "captioned ", h("b", { text: `${st.captioned}/${st.images}` })),
          h("span", { class: "stat" }, "words ", h("b", { text: `${st.words_min} / ${st.words_median} / ${st.words_max}` }), " min/median/max")),
        h("h3", { text: `Buckets at resolution ${resolution}` }),
        h("table", { id: "bucket-plan" }, h("tr", {}, h("th", { text: "bucket (WxH)" }), h("th", { text: "images" })),
          ...s.buckets.map((b) => h("tr", {}, h("td", { text: `${b.width}x${b.height}` }), h("td", { text: b.images })))),
        h("h3", { text: "Most common tags" }),
        h("div", { class: "muted", text: st.top_tags.map(([t, n]) => `${t} x${n}`).join(" · ") || "none repeat" })),
      h("div", { class: "panel", id: "scan-problems" }, h("b", { text: "Problems" }),
        problems.length ? h("ul", {}, ...problems.map((p) => h("li", { class: "error", text: p }))) : h("div", { class: "muted", text: "none" }),
        h("details", {}, h("summary", { text: "--check summary" }), h("pre", { class: "light", text: s.summary })))));
  } catch (e) {
    box.replaceChildren(h("div", { class: "error", text: e.message }));
  }
}

async function autoCaption(main, info) {
  const prefix = prompt("Prefix for every caption (e.g. 'photo of sks dog, '), or empty:", "");
  if (prefix === null) return;
  let job = await post("/api/data/caption-all", { path: current, prefix });
  toast("captioning...");
  while (job.running) {
    await new Promise((r) => setTimeout(r, 1500));
    job = await get(`/api/jobs/${job.id}`);
  }
  toast(job.exit_code === 0 ? "captions written" : `captioning failed: ${job.log.slice(-1)[0] || ""}`, job.exit_code !== 0);
  go(main, info, current);
}
