// histolite upload page: no framework, no CDN. Talks to /v1/models and
// /v1/models/{name}/versions/{version}/predict.
"use strict";

const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const template = document.getElementById("result-template");

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function headers() {
  const key = document.getElementById("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

const picker = document.getElementById("model-select");
const cards = new Map();

function describe(key, card) {
  // the repository's name and version (what the request uses), not the card's own labels
  const [name, version] = key.split("/");
  const kind = card.kind === "mil" ? `attention MIL, ${card.mil.pooling} pooling` : card.model;
  return `Model ${name} v${version} (${kind}, ${card.precision}) · ` +
    `${card.classes.length} classes · input ${card.input_size} px · patches ${card.patch_size} px`;
}

function showChoice() {
  const card = cards.get(picker.value);
  document.getElementById("model-line").textContent = card ? describe(picker.value, card) : "No model";
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      document.getElementById("model-line").textContent =
        "This server needs an API key: enter it under 'API key' below.";
      return;
    }
    const listing = await response.json();
    picker.replaceChildren();
    for (const model of listing.models) {
      for (const version of model.versions) {
        const key = `${model.name}/${version.version}`;
        cards.set(key, version.card);
        const option = document.createElement("option");
        option.value = key;
        const newest = version.version === model.default_version ? " (newest)" : "";
        option.textContent = `${model.name} v${version.version}${newest}`;
        picker.appendChild(option);
      }
    }
    picker.value = `${listing.default.name}/${listing.default.version}`;
    showChoice();
  } catch (err) {
    document.getElementById("model-line").textContent = "Model list unavailable";
  }
}
picker.addEventListener("change", showChoice);
document.getElementById("api-key").addEventListener("change", loadModels);

async function send(body, isJson, label) {
  setStatus(`Classifying ${label}…`);
  const init = { method: "POST", headers: headers(), body };
  if (isJson) init.headers["Content-Type"] = "application/json";
  const [name, version] = (picker.value || "").split("/");
  const path = name
    ? `/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/predict`
    : "/v1/predict";
  const response = await fetch(path, init);
  const payload = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    throw new Error(`${response.status}: ${payload.detail || "request failed"}`);
  }
  return payload.predictions;
}

function drawImage(canvas, source) {
  canvas.width = source.naturalWidth || source.width;
  canvas.height = source.naturalHeight || source.height;
  canvas.getContext("2d").drawImage(source, 0, 0);
}

function drawCells(canvas, cells, colour, kind, width, height, outline) {
  // The overlay: boxes {x, y, width, height, weight} in image pixels, each shaded by its
  // weight (the largest is most opaque). Attention and Grad-CAM both go through it.
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const top = cells.reduce((m, a) => Math.max(m, a.weight), 0) || 1;
  for (const a of cells) {
    ctx.fillStyle = `rgba(${colour}, ${(0.7 * a.weight / top).toFixed(3)})`;
    ctx.fillRect(a.x, a.y, a.width, a.height);
    if (outline) {
      ctx.strokeStyle = "rgba(255,255,255,0.6)";
      ctx.strokeRect(a.x, a.y, a.width, a.height);
    }
  }
  canvas.dataset.cells = String(cells.length);
  canvas.dataset.kind = kind;
}

function drawAttention(canvas, prediction, width, height) {
  // A bag model: each patch is shaded by its share of the attention.
  drawCells(canvas, prediction.attention, "255, 200, 0", "attention", width, height, true);
}

function drawGradcam(canvas, explanation, width, height) {
  // A patch model: its Grad-CAM grid (cells in image pixels). Both edges of a cell are
  // rounded the same way, so neighbours share an edge: no gaps and no twice-shaded seams.
  const cells = [];
  const ch = explanation.cell_height;
  const cw = explanation.cell_width;
  explanation.values.forEach((row, r) => row.forEach((weight, c) => {
    const x = Math.round(c * cw);
    const y = Math.round(r * ch);
    cells.push({ x, y, width: Math.round((c + 1) * cw) - x, height: Math.round((r + 1) * ch) - y, weight });
  }));
  drawCells(canvas, cells, "230, 30, 30", "gradcam", width, height, false);
}

function drawHeatmap(canvas, prediction, width, height) {
  // Each patch is shaded by its probability of the predicted class.
  canvas.width = width;
  canvas.height = height;
  canvas.dataset.kind = "probability";
  const ctx = canvas.getContext("2d");
  const grid = prediction.patches;
  const classIndex = Object.keys(prediction.probabilities).indexOf(prediction.class);
  const single = grid.rows * grid.cols === 1;
  const size = single ? Math.min(width, height) : grid.size;
  let cells = 0;
  for (let r = 0; r < grid.rows; r++) {
    for (let c = 0; c < grid.cols; c++) {
      const p = grid.probabilities[r][c][classIndex];
      // green contrasts with pink/purple H&E; opacity = probability of the predicted class
      ctx.fillStyle = `rgba(0, 190, 110, ${(0.6 * p).toFixed(3)})`;
      ctx.fillRect(c * grid.stride, r * grid.stride, single ? width : size, single ? height : size);
      ctx.strokeStyle = "rgba(255,255,255,0.6)";
      ctx.strokeRect(c * grid.stride, r * grid.stride, single ? width : size, single ? height : size);
      cells++;
    }
  }
  canvas.dataset.cells = String(cells);
}

function render(prediction, imageSource) {
  const node = template.content.firstElementChild.cloneNode(true);
  node.dataset.class = prediction.class;
  node.querySelector(".class-name").textContent = prediction.class;
  node.querySelector(".class-prob").textContent = `${(100 * prediction.probability).toFixed(1)}%`;
  const isBag = Array.isArray(prediction.attention);
  const layout = isBag
    ? `a bag of ${prediction.attention.length} patches`
    : `${prediction.patches.rows}×${prediction.patches.cols} patches`;
  node.querySelector(".meta").textContent =
    `${prediction.filename || ""} · ${prediction.image_size.width}×${prediction.image_size.height} px · ` +
    `${layout} · ${prediction.model} v${prediction.model_version} · ${prediction.time_ms} ms`;
  const bars = node.querySelector(".bars");
  const entries = Object.entries(prediction.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of entries) {
    const li = document.createElement("li");
    if (name === prediction.class) li.classList.add("top");
    li.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span><span class="value"></span>`;
    li.querySelector(".name").textContent = name;
    li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    li.querySelector(".value").textContent = `${(100 * p).toFixed(1)}%`;
    bars.appendChild(li);
  }
  const imageCanvas = node.querySelector("canvas.image");
  const heat = node.querySelector("canvas.heatmap");
  const cam = node.querySelector("canvas.gradcam");
  if (imageSource) {
    drawImage(imageCanvas, imageSource);
  } else {
    imageCanvas.width = prediction.image_size.width;
    imageCanvas.height = prediction.image_size.height;
  }
  if (isBag) {
    drawAttention(heat, prediction, prediction.image_size.width, prediction.image_size.height);
    node.querySelector(".heatmap-name").textContent = "attention";
    node.querySelector(".legend").textContent =
      "yellow: how much each patch decided the class (attention; the largest is most opaque)";
  } else {
    drawHeatmap(heat, prediction, prediction.image_size.width, prediction.image_size.height);
    node.querySelector(".legend").textContent =
      `heatmap: probability of ${prediction.class} in each ${prediction.patches.size} px patch`;
  }
  if (prediction.explanation) {
    // Grad-CAM shows first; the patch heatmap stays one click away
    drawGradcam(cam, prediction.explanation, prediction.image_size.width, prediction.image_size.height);
    node.querySelector(".gradcam-toggle").hidden = false;
    node.querySelector(".show-heatmap").checked = false;
    heat.style.visibility = "hidden";
    node.querySelector(".legend").textContent =
      `red: where the model saw ${prediction.class} (Grad-CAM, strongest most opaque); ` +
      `patch heatmap: probability of ${prediction.class} in each ${prediction.patches.size} px patch`;
  } else {
    cam.style.visibility = "hidden";
  }
  node.querySelector(".show-heatmap").addEventListener("change", (e) => {
    heat.style.visibility = e.target.checked ? "visible" : "hidden";
  });
  node.querySelector(".show-gradcam").addEventListener("change", (e) => {
    cam.style.visibility = e.target.checked ? "visible" : "hidden";
  });
  results.prepend(node);
}

function loadPreview(file) {
  // Browsers cannot show TIFF: the prediction is still drawn, over a blank canvas.
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null);
    img.src = URL.createObjectURL(file);
  });
}

async function classifyFiles(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  try {
    const predictions = await send(form, false, `${files.length} image(s)`);
    for (let i = 0; i < predictions.length; i++) render(predictions[i], await loadPreview(files[i]));
    setStatus(`Done: ${predictions.length} image(s) classified.`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

document.getElementById("file-input").addEventListener("change", (e) => classifyFiles([...e.target.files]));

const zone = document.getElementById("drop-zone");
for (const type of ["dragenter", "dragover"]) {
  zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
}
for (const type of ["dragleave", "drop"]) {
  zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("dragging"); });
}
zone.addEventListener("drop", (e) => classifyFiles([...e.dataTransfer.files]));

document.getElementById("url-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const url = document.getElementById("url-input").value.trim();
  if (!url) return;
  try {
    const [prediction] = await send(JSON.stringify({ url }), true, url);
    const img = await new Promise((resolve) => {
      const im = new Image();
      im.crossOrigin = "anonymous";
      im.onload = () => resolve(im);
      im.onerror = () => resolve(null);
      im.src = url;
    });
    render(prediction, img);
    setStatus("Done.");
  } catch (err) {
    setStatus(err.message, true);
  }
});

loadModels();
