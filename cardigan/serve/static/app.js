// Cardigan search page: plain JS, no build step. Talks to the same API as any client.
"use strict";

const $ = (id) => document.getElementById(id);

// API calls; a 401 asks for the token once and keeps it in a same-site cookie, which also
// lets <img> tags load catalog images through the service.
async function api(path, options) {
  let resp = await fetch(path, options);
  if (resp.status === 401) {
    const token = window.prompt("This search service needs its access token:");
    if (token) {
      document.cookie = "cardigan_token=" + encodeURIComponent(token) + "; path=/; SameSite=Strict";
      resp = await fetch(path, options);
    }
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.error ? body.error : resp.status + " " + resp.statusText;
    throw new Error(msg);
  }
  return body;
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

function card(hit, onClick) {
  const el = document.createElement(onClick ? "button" : "div");
  el.className = "card";
  el.dataset.productId = hit.product_id;
  const img = document.createElement("img");
  img.alt = hit.product_id;
  img.src = hit.image_url || "/v1/products/" + encodeURIComponent(hit.product_id) + "/images/0";
  const meta = document.createElement("div");
  meta.className = "meta";
  const pid = document.createElement("div");
  pid.className = "pid";
  pid.textContent = hit.product_id;
  meta.appendChild(pid);
  if (typeof hit.score === "number") {
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = "score " + hit.score.toFixed(3);
    meta.appendChild(score);
  }
  if (hit.attributes && hit.attributes.category) {
    const cat = document.createElement("div");
    cat.className = "cat";
    cat.textContent = hit.attributes.category;
    meta.appendChild(cat);
  }
  el.append(img, meta);
  if (onClick) el.addEventListener("click", () => onClick(hit));
  return el;
}

function fill(grid, hits, onClick) {
  grid.replaceChildren(...hits.map((h) => card(h, onClick)));
}

// ---------------------------------------------------------------- search page

function searchPage() {
  const canvas = $("preview");
  const ctx = canvas.getContext("2d");
  let file = null;
  let image = null; // the decoded photo, upright as the browser shows it
  let scale = 1; // canvas pixels per photo pixel
  let box = null; // [x0, y0, x1, y1] in photo pixels
  let drag = null;

  function draw() {
    if (!image) return;
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    if (box) {
      ctx.strokeStyle = "#8a3ffc";
      ctx.lineWidth = 3;
      ctx.strokeRect(box[0] * scale, box[1] * scale, (box[2] - box[0]) * scale, (box[3] - box[1]) * scale);
    }
    $("bbox-label").textContent = box ? "Box: " + box.map(Math.round).join(", ") : "";
    $("clear-box").hidden = !box;
  }

  function choose(f) {
    if (!f) return;
    file = f;
    box = null;
    const url = URL.createObjectURL(f);
    const img = new Image();
    img.onload = () => {
      image = img;
      scale = Math.min(1, 480 / img.naturalWidth, 360 / img.naturalHeight);
      canvas.width = Math.round(img.naturalWidth * scale);
      canvas.height = Math.round(img.naturalHeight * scale);
      $("canvas-wrap").hidden = false;
      $("go").disabled = false;
      draw();
      setStatus(f.name + " (" + img.naturalWidth + "×" + img.naturalHeight + ")");
    };
    img.onerror = () => {
      // let the server say what is wrong with it
      image = null;
      $("canvas-wrap").hidden = true;
      $("go").disabled = false;
      setStatus(f.name + ": the browser cannot show this file; searching will say why");
    };
    img.src = url;
  }

  function photoPoint(ev) {
    const r = canvas.getBoundingClientRect();
    const x = ((ev.clientX - r.left) * (canvas.width / r.width)) / scale;
    const y = ((ev.clientY - r.top) * (canvas.height / r.height)) / scale;
    return [Math.max(0, Math.min(image.naturalWidth, x)), Math.max(0, Math.min(image.naturalHeight, y))];
  }

  canvas.addEventListener("pointerdown", (ev) => {
    if (!image) return;
    drag = photoPoint(ev);
    canvas.setPointerCapture(ev.pointerId);
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const p = photoPoint(ev);
    box = [Math.min(drag[0], p[0]), Math.min(drag[1], p[1]), Math.max(drag[0], p[0]), Math.max(drag[1], p[1])];
    draw();
  });
  canvas.addEventListener("pointerup", () => {
    drag = null;
    if (box && (box[2] - box[0] < 4 || box[3] - box[1] < 4)) box = null; // a click, not a box
    draw();
  });
  $("clear-box").addEventListener("click", () => { box = null; draw(); });

  $("file").addEventListener("change", (ev) => choose(ev.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    choose(ev.dataTransfer.files[0]);
  });

  function filterJson() {
    const cat = $("category").value.trim();
    return cat ? JSON.stringify({ category: cat }) : "";
  }

  async function showSimilar(hit) {
    const k = $("k").value || "12";
    const params = new URLSearchParams({ k });
    const f = filterJson();
    if (f) params.set("filter", f);
    setStatus("Finding items similar to " + hit.product_id + "…");
    try {
      const res = await api("/v1/products/" + encodeURIComponent(hit.product_id) + "/similar?" + params);
      $("similar-title").textContent = "Similar to " + hit.product_id;
      $("similar-title").hidden = false;
      fill($("similar"), res.results, showSimilar);
      setStatus(res.results.length + " items similar to " + hit.product_id);
      $("similar-title").scrollIntoView({ behavior: "smooth", block: "start" });
    } catch (e) {
      setStatus(e.message, true);
    }
  }

  $("go").addEventListener("click", async () => {
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    form.append("k", $("k").value || "12");
    if (box) form.append("bbox", box.map((v) => v.toFixed(1)).join(","));
    const f = filterJson();
    if (f) form.append("filter", f);
    $("go").disabled = true;
    setStatus("Searching…");
    try {
      const res = await api("/v1/search", { method: "POST", body: form });
      $("results-title").hidden = false;
      $("results-title").textContent = "Results (" + res.results.length + ")";
      fill($("results"), res.results, showSimilar);
      $("similar-title").hidden = true;
      $("similar").replaceChildren();
      setStatus(res.results.length ? "Click a result for similar items." : "No products match.");
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      $("go").disabled = false;
    }
  });
}

// ---------------------------------------------------------------- duplicates page

async function duplicatesPage() {
  try {
    const res = await api("/v1/duplicates?limit=50");
    const groups = $("groups");
    groups.replaceChildren();
    for (const g of res.groups) {
      const box = document.createElement("section");
      box.className = "group";
      const h = document.createElement("h2");
      h.textContent = g.products.length + " listings, closest pair scores " + g.score.toFixed(3);
      const row = document.createElement("div");
      row.className = "row";
      row.append(...g.products.map((p) => card(p, null)));
      box.append(h, row);
      groups.appendChild(box);
    }
    setStatus(
      res.groups.length + " group(s) of near-duplicates (score ≥ " + res.threshold + ") from " +
      res.pairs_recorded + " recorded pair(s)"
    );
  } catch (e) {
    setStatus(e.message, true);
  }
}

if (document.body.dataset.page === "duplicates") duplicatesPage();
else searchPage();
