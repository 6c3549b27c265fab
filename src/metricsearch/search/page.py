"""The single HTML page of the search server: upload an image or click a gallery image, see the top-k results.

Every search sends the page's options with it: the number of results, the filters (only a class, only a folder of
the gallery) and the re-ranking method (the server's default selected; the menu lists the methods it offers).

Plain HTML, CSS and JavaScript in one string, so the page needs no build step, no static-file packaging and
no network (no CDN). Every text that comes from the server is inserted with ``textContent``, never as HTML,
so a file name cannot inject markup.
"""

from __future__ import annotations

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>MetricSearch</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
  header { padding: 12px 20px; background: #1f3b70; color: #fff; }
  header h1 { margin: 0; font-size: 20px; }
  #info { font-size: 13px; opacity: 0.85; }
  main { padding: 16px 20px; }
  section { margin-bottom: 22px; }
  h2 { font-size: 16px; margin: 0 0 8px; }
  form { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
  #error { color: #b00020; font-weight: 600; min-height: 1.2em; }
  #status { color: #555; font-size: 13px; min-height: 1.2em; }
  .grid { display: flex; flex-wrap: wrap; gap: 10px; }
  .card { width: 150px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px;
          font-size: 12px; overflow-wrap: anywhere; }
  .card img { width: 150px; height: 150px; object-fit: contain; background: #eee; display: block; }
  .gallery-item { cursor: pointer; }
  .gallery-item:hover { border-color: #1f3b70; }
  .score { font-weight: 600; }
  #query-preview img { width: 180px; height: 180px; object-fit: contain; background: #eee;
                       border: 3px solid #2858c8; }
</style>
</head>
<body>
<header><h1>MetricSearch</h1><div id="info">loading&hellip;</div></header>
<main>
  <section>
    <h2>Search by example</h2>
    <form id="upload-form">
      <input type="file" id="file-input" name="file" accept="image/*">
      <label>top <input type="number" id="k-input" min="1" max="100" value="10" style="width:4em"></label>
      <button type="submit" id="search-button">Search</button>
    </form>
    <form id="options-form">
      <label>only class <input type="text" id="label-input" placeholder="any" maxlength="1024"
        style="width:9em"></label>
      <label>only folder <input type="text" id="folder-input" placeholder="any (e.g. shoes/red)" maxlength="1024"
        style="width:12em"></label>
      <label>re-ranking <select id="postprocess-select"></select></label>
    </form>
    <div id="status"></div>
    <div id="error" role="alert"></div>
  </section>
  <section id="query-section" hidden>
    <h2>Query</h2>
    <div id="query-preview"></div>
  </section>
  <section>
    <h2>Results</h2>
    <div id="results" class="grid"></div>
  </section>
  <section>
    <h2>Gallery <span id="gallery-count"></span> &mdash; click an image to search with it</h2>
    <div id="gallery" class="grid"></div>
    <button id="more-button" hidden>Show more</button>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let galleryOffset = 0;
let queryObjectUrl = null;

function setError(text) { $("error").textContent = text || ""; }
function setStatus(text) { $("status").textContent = text || ""; }

function card(imageUrl, lines, extraClass, lazy) {
  const div = document.createElement("div");
  div.className = "card" + (extraClass ? " " + extraClass : "");
  const img = document.createElement("img");
  img.src = imageUrl;
  img.alt = lines[lines.length - 1];
  // Gallery pages can be long: their thumbnails load as they scroll into view; results load at once.
  if (lazy) img.loading = "lazy";
  div.appendChild(img);
  for (const [text, cls] of lines.map((l) => (Array.isArray(l) ? l : [l, ""]))) {
    const p = document.createElement("div");
    p.textContent = text;
    if (cls) p.className = cls;
    div.appendChild(p);
  }
  return div;
}

function showQuery(imageUrl, caption) {
  const preview = $("query-preview");
  preview.replaceChildren();
  const img = document.createElement("img");
  img.src = imageUrl;
  img.alt = caption;
  const text = document.createElement("div");
  text.textContent = caption;
  preview.append(img, text);
  $("query-section").hidden = false;
}

function showResults(data) {
  const results = $("results");
  results.replaceChildren();
  for (const hit of data.results) {
    const label = hit.label === null ? "" : "label " + hit.label;
    const div = card(hit.url, [["#" + hit.rank + "  score " + hit.score.toFixed(3), "score"], label, hit.path],
                     "result");
    div.dataset.path = hit.path;
    div.dataset.score = hit.score;
    results.appendChild(div);
  }
  const method = data.postprocess ? data.postprocess.method : "none";
  setStatus(data.results.length + " results in " + data.took_ms.toFixed(1) + " ms" +
            (method === "none" ? "" : ", re-ranked by " + method));
}

async function search(formData) {
  setError("");
  setStatus("searching\u2026");
  formData.append("k", $("k-input").value || "10");
  // Empty fields are left out: no filter.
  for (const [field, id] of [["label", "label-input"], ["folder", "folder-input"]]) {
    const value = $(id).value.trim();
    if (value) formData.append(field, value);
  }
  if ($("postprocess-select").value) formData.append("postprocess", $("postprocess-select").value);
  try {
    const response = await fetch("/api/search", { method: "POST", body: formData });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      setStatus("");
      setError(data.detail || ("search failed (HTTP " + response.status + ")"));
      return;
    }
    showResults(data);
  } catch (err) {
    setStatus("");
    setError("search failed: " + err);
  }
}

$("options-form").addEventListener("submit", (event) => event.preventDefault());

$("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = $("file-input").files[0];
  if (!file) { setError("choose an image file first"); return; }
  if (queryObjectUrl) URL.revokeObjectURL(queryObjectUrl);
  queryObjectUrl = URL.createObjectURL(file);
  showQuery(queryObjectUrl, file.name);
  const formData = new FormData();
  formData.append("file", file);
  search(formData);
});

async function loadGallery() {
  const response = await fetch("/api/gallery?offset=" + galleryOffset + "&limit=" + GALLERY_PAGE);
  const data = await response.json();
  $("gallery-count").textContent = "(" + data.total + " images)";
  for (const item of data.items) {
    const label = item.label === null ? "" : "label " + item.label;
    const div = card(item.url, [label, item.path], "gallery-item", true);
    div.dataset.path = item.path;
    div.addEventListener("click", () => {
      showQuery(item.url, item.path);
      const formData = new FormData();
      formData.append("path", item.path);
      search(formData);
    });
    $("gallery").appendChild(div);
  }
  galleryOffset += data.items.length;
  $("more-button").hidden = galleryOffset >= data.total;
}

$("more-button").addEventListener("click", loadGallery);

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  $("info").textContent = info.count + " images \u00b7 " + info.embedding_dim + "-d \u00b7 " + info.index_kind +
    " index \u00b7 " + info.model;
  $("k-input").value = info.default_k;
  $("k-input").max = info.max_k;
  const select = $("postprocess-select");
  select.replaceChildren();
  for (const method of info.postprocess_methods || ["none"]) {
    const option = document.createElement("option");
    option.value = method;
    option.textContent = method;
    option.selected = method === info.postprocess;
    select.appendChild(option);
  }
}

const GALLERY_PAGE = __GALLERY_PAGE__;
loadInfo().then(loadGallery).catch((err) => setError("cannot reach the server: " + err));
</script>
</body>
</html>
"""


def render_page(gallery_page_size: int) -> str:
    """The page, with the number of gallery thumbnails loaded per click filled in."""
    return PAGE_HTML.replace("__GALLERY_PAGE__", str(int(gallery_page_size)))
