// The beyond playground: plain JavaScript, no build step, nothing loaded from anywhere but this server.
"use strict";

const SIDES = ["left", "right", "top", "bottom"];
const MAX_EXTENSION = 1024;
// What the server assumes for an image it fetches itself by URL, when the browser cannot show it.
const UNKNOWN_SIZE = [1024, 1024];
const KEY_STORAGE = "beyond.apiKey";
const EDGE_GRAB = 8; // CSS pixels either side of an edge that start a drag
const MARGIN = 16; // CSS pixels kept free around the padded canvas
const MAX_LORAS = 4;

const $ = (id) => document.getElementById(id);

const state = {
  image: null, // an HTMLImageElement to draw, or null (nothing picked, or the browser could not read it)
  size: null, // [width, height] of the input; null while unknown
  input: null, // what is sent as input_image: base64 of the file, or the URL as given
  layout: null, // where the last draw put things, in CSS pixels
  drag: null, // {side, layout} while an edge is dragged: the layout stays put so the edge follows the pointer
  run: null, // {id, controller} while a request runs
  loras: [], // the usable LoRAs of the server (GET /v1/loras)
  seamWidth: 16, // seam_width's default, from the API's description: sent only when changed
};

// ---------------------------------------------------------------- API access

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { "x-api-key": key } : {};
}

async function apiError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch (_) {
    // not JSON: keep the status line
  }
  return new Error(message);
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.body ? { "content-type": "application/json" } : {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) throw await apiError(response);
  return response.json();
}

// Server-sent events read from a fetch() body: EventSource cannot send the x-api-key header.
// Yields {event, data} per event; comments (the keep-alive pings) and other fields are skipped.
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let name = "message";
  let data = [];
  const take = function* (line) {
    if (line === "") {
      if (data.length) yield { event: name, data: data.join("\n") };
      name = "message";
      data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      // A chunk may end between the \r and \n of one line end: hold a trailing \r until more comes.
      const cut = !done && buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(cut);
      for (const line of lines) yield* take(line);
      if (done) {
        if (buffer) yield* take(buffer);
        yield* take("");
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---------------------------------------------------------------- messages

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---------------------------------------------------------------- the image

function useImage(src, input, { referrer = true } = {}) {
  clearError();
  const image = new Image();
  if (!referrer) image.referrerPolicy = "no-referrer";
  image.onload = () => {
    state.image = image;
    state.size = [image.naturalWidth, image.naturalHeight];
    state.input = input;
    draw();
  };
  image.onerror = () => {
    // The server may still read it (or fetch it, for a URL): send it anyway, shown as a blank frame.
    state.image = null;
    state.size = null;
    state.input = input;
    draw();
    showError("This browser cannot show that image; the server will still try it (size assumed 1024×1024).");
  };
  image.src = src;
}

function useFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const dataUrl = String(reader.result);
    useImage(dataUrl, dataUrl.slice(dataUrl.indexOf(",") + 1));
  };
  reader.onerror = () => showError("Could not read that file.");
  reader.readAsDataURL(file);
}

function useUrl(url) {
  url = url.trim();
  if (!url) return;
  if (!/^https?:\/\//i.test(url)) {
    showError("input_image: a URL must start with http:// or https://");
    return;
  }
  $("url").value = url;
  useImage(url, url, { referrer: false });
}

// ---------------------------------------------------------------- extensions and the canvas

function extensions() {
  const result = {};
  for (const side of SIDES) {
    const value = Number.parseInt($(side).value, 10);
    result[side] = Number.isFinite(value) ? Math.min(MAX_EXTENSION, Math.max(0, value)) : 0;
  }
  return result;
}

function fitLayout(canvas, size, ext) {
  const width = size[0] + ext.left + ext.right;
  const height = size[1] + ext.top + ext.bottom;
  const scale = Math.min((canvas.clientWidth - 2 * MARGIN) / width, (canvas.clientHeight - 2 * MARGIN) / height);
  const x = (canvas.clientWidth - width * scale) / 2;
  const y = (canvas.clientHeight - height * scale) / 2;
  return { scale, imageX: x + ext.left * scale, imageY: y + ext.top * scale };
}

let stripes = null;

function stripePattern(ctx) {
  if (!stripes) {
    const tile = document.createElement("canvas");
    tile.width = tile.height = 12;
    const t = tile.getContext("2d");
    t.fillStyle = "#dfe6f3";
    t.fillRect(0, 0, 12, 12);
    t.strokeStyle = "#b8c6e3";
    t.lineWidth = 3;
    t.beginPath();
    t.moveTo(-3, 15);
    t.lineTo(15, -3);
    t.stroke();
    stripes = tile;
  }
  return ctx.createPattern(stripes, "repeat");
}

function draw() {
  const canvas = $("canvas");
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth;
  const cssHeight = canvas.clientHeight;
  if (canvas.width !== Math.round(cssWidth * ratio) || canvas.height !== Math.round(cssHeight * ratio)) {
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssWidth, cssHeight);

  if (!state.input) {
    state.layout = null;
    delete canvas.dataset.frame;
    ctx.fillStyle = "#6b7280";
    ctx.font = "16px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("Choose, drop or link an image", cssWidth / 2, cssHeight / 2);
    $("size").textContent = "";
    return;
  }

  const size = state.size || UNKNOWN_SIZE;
  const ext = extensions();
  const fit = state.drag ? state.drag.layout : fitLayout(canvas, size, ext);
  const { scale, imageX, imageY } = fit;
  const frame = {
    x: imageX - ext.left * scale,
    y: imageY - ext.top * scale,
    w: (size[0] + ext.left + ext.right) * scale,
    h: (size[1] + ext.top + ext.bottom) * scale,
  };
  // The new area, shaded; the image drawn over its own part.
  ctx.fillStyle = stripePattern(ctx);
  ctx.fillRect(frame.x, frame.y, frame.w, frame.h);
  if (state.image) {
    ctx.drawImage(state.image, imageX, imageY, size[0] * scale, size[1] * scale);
  } else {
    ctx.fillStyle = "#9ca3af";
    ctx.fillRect(imageX, imageY, size[0] * scale, size[1] * scale);
  }
  ctx.strokeStyle = "#1f2937";
  ctx.setLineDash([4, 3]);
  ctx.lineWidth = 1;
  ctx.strokeRect(imageX + 0.5, imageY + 0.5, size[0] * scale - 1, size[1] * scale - 1);
  ctx.setLineDash([]);
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 2;
  ctx.strokeRect(frame.x, frame.y, frame.w, frame.h);
  // Handles at the middle of each edge, to show they can be dragged.
  ctx.fillStyle = "#2563eb";
  for (const [hx, hy] of [
    [frame.x, frame.y + frame.h / 2],
    [frame.x + frame.w, frame.y + frame.h / 2],
    [frame.x + frame.w / 2, frame.y],
    [frame.x + frame.w / 2, frame.y + frame.h],
  ]) {
    ctx.fillRect(hx - 4, hy - 4, 8, 8);
  }

  state.layout = { ...fit, frame, size };
  // Where the padded area is on the page, in CSS pixels: handy for scripts driving the page.
  canvas.dataset.frame = [frame.x, frame.y, frame.w, frame.h].map((v) => v.toFixed(1)).join(",");
  const known = state.size ? "" : " (size unknown: assumed)";
  $("size").textContent =
    `input ${size[0]}×${size[1]}${known} → output ${size[0] + ext.left + ext.right}×${size[1] + ext.top + ext.bottom}`;
}

function edgeAt(x, y) {
  const layout = state.layout;
  if (!layout) return null;
  const f = layout.frame;
  const alongY = y >= f.y - EDGE_GRAB && y <= f.y + f.h + EDGE_GRAB;
  const alongX = x >= f.x - EDGE_GRAB && x <= f.x + f.w + EDGE_GRAB;
  if (alongY && Math.abs(x - f.x) <= EDGE_GRAB) return "left";
  if (alongY && Math.abs(x - (f.x + f.w)) <= EDGE_GRAB) return "right";
  if (alongX && Math.abs(y - f.y) <= EDGE_GRAB) return "top";
  if (alongX && Math.abs(y - (f.y + f.h)) <= EDGE_GRAB) return "bottom";
  return null;
}

function pointerAt(event) {
  const box = $("canvas").getBoundingClientRect();
  return [event.clientX - box.left, event.clientY - box.top];
}

function dragTo(x, y) {
  const { side, layout } = state.drag;
  const { scale, imageX, imageY, size } = layout;
  const pixels = {
    left: (imageX - x) / scale,
    right: (x - (imageX + size[0] * scale)) / scale,
    top: (imageY - y) / scale,
    bottom: (y - (imageY + size[1] * scale)) / scale,
  }[side];
  $(side).value = String(Math.round(Math.min(MAX_EXTENSION, Math.max(0, pixels))));
  draw();
}

function setUpCanvas() {
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", (event) => {
    const [x, y] = pointerAt(event);
    const side = edgeAt(x, y);
    if (!side) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    state.drag = { side, layout: state.layout };
  });
  canvas.addEventListener("pointermove", (event) => {
    const [x, y] = pointerAt(event);
    if (state.drag) {
      dragTo(x, y);
      return;
    }
    const side = edgeAt(x, y);
    canvas.style.cursor = side === "left" || side === "right" ? "ew-resize" : side ? "ns-resize" : "";
  });
  const end = () => {
    if (!state.drag) return;
    state.drag = null;
    draw(); // refit: the padded area may have grown past the view while dragging
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);

  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) {
      useFile(file);
      return;
    }
    const url = (event.dataTransfer.getData("text/uri-list") || event.dataTransfer.getData("text/plain")).split(/\s/)[0];
    if (url) useUrl(url);
  });

  for (const side of SIDES) $(side).addEventListener("input", draw);
  window.addEventListener("resize", draw);
}

// ---------------------------------------------------------------- options

function fillSelect(select, names, selected) {
  select.replaceChildren(
    ...names.map((name) => {
      const option = new Option(name, name);
      option.selected = selected.includes(name);
      return option;
    }),
  );
}

// The names a field of the request body takes: its enum, or the enum of the schema it refers to.
function choices(schemas, property) {
  if (property.enum) return property.enum;
  return schemas[property.$ref.split("/").pop()].enum;
}

// The samplers and schedulers the API accepts and the request's defaults, from the API's own description
// (/openapi.json), so the page keeps no copy of them; then the styles.
async function loadOptions() {
  let defaultStyles = [];
  try {
    const schemas = (await api("openapi.json")).components.schemas;
    const request = schemas.SegBeyondRequest.properties;
    fillSelect($("sampler"), choices(schemas, request.sampler), [request.sampler.default]);
    fillSelect($("scheduler"), choices(schemas, request.scheduler), [request.scheduler.default]);
    defaultStyles = request.styles.default.split(",").filter(Boolean);
    state.seamWidth = request.seam_width.default;
    $("seam-width").value = String(state.seamWidth);
  } catch (error) {
    showError(`Could not read the API's options: ${error.message}`);
  }
  await Promise.all([loadStyles(defaultStyles), loadLoras()]);
}

// ---------------------------------------------------------------- LoRAs (an extension: sent only when chosen)

async function loadLoras() {
  const hint = $("loras-hint");
  try {
    const body = await api("v1/loras");
    state.loras = body.loras.filter((lora) => !lora.error).map((lora) => lora.name);
    hint.textContent = state.loras.length ? `${state.loras.length} on this server` : "none on this server";
  } catch (error) {
    state.loras = [];
    hint.textContent = `cannot list them: ${error.message}`;
  }
  for (const select of document.querySelectorAll("#loras select")) {
    const chosen = select.value;
    fillSelect(select, state.loras, [chosen]);
  }
  updateLoraButton();
}

function updateLoraButton() {
  $("add-lora").disabled = !state.loras.length || $("loras").children.length >= MAX_LORAS;
}

function addLora() {
  const row = document.createElement("div");
  row.className = "lora";
  const name = document.createElement("select");
  name.setAttribute("aria-label", "LoRA");
  fillSelect(name, state.loras, [state.loras[0]]);
  const scale = document.createElement("input");
  Object.assign(scale, { type: "number", min: "-2", max: "2", step: "0.05", value: "1", title: "scale, -2 to 2" });
  scale.setAttribute("aria-label", "LoRA scale");
  const remove = document.createElement("button");
  Object.assign(remove, { type: "button", textContent: "×", title: "remove this LoRA" });
  remove.addEventListener("click", () => {
    row.remove();
    updateLoraButton();
  });
  row.append(name, scale, remove);
  $("loras").append(row);
  updateLoraButton();
}

function chosenLoras() {
  return Array.from($("loras").children, (row) => ({
    name: row.querySelector("select").value,
    scale: Number(row.querySelector("input").value),
  })).filter((lora) => lora.name);
}

async function loadStyles(defaults) {
  const select = $("styles");
  try {
    const body = await api("v1/styles");
    select.replaceChildren(
      ...body.styles.map((style) => {
        const option = new Option(style.name, style.name);
        option.title = style.description || style.positive || "";
        option.selected = defaults.includes(style.name);
        return option;
      }),
    );
  } catch (error) {
    fillSelect(select, defaults, defaults);
    showError(`Could not list the styles: ${error.message}`);
  }
}

// ---------------------------------------------------------------- running a request

function requestBody() {
  const ext = extensions();
  const body = {
    input_image: state.input,
    prompt: $("prompt").value,
    styles: Array.from($("styles").selectedOptions, (option) => option.value).join(","),
    sampler: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    seed: Number($("seed").value),
    samples: Number($("samples").value),
    ...ext,
    base64: false,
  };
  const negative = $("negative-prompt").value;
  if (negative.trim()) body.negative_prompt = negative;
  // Extensions go only when used, so an untouched form sends what the hosted API takes.
  const seam = Number($("seam-width").value);
  if (seam !== state.seamWidth) body.seam_width = seam;
  if ($("color-match").checked) body.color_match = true;
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  return body;
}

function showStatus(body) {
  const bar = $("progress");
  const text = $("status");
  if (body.status === "QUEUED") {
    bar.removeAttribute("value"); // indeterminate while waiting
    text.textContent = body.queue_position ? `queued: ${body.queue_position} ahead` : "queued: next";
  } else if (body.status === "PROCESSING") {
    const progress = Number(body.progress) || 0;
    bar.value = progress;
    text.textContent = `processing ${Math.round(progress * 100)}%`;
  }
  if (body.preview) {
    $("preview").src = body.preview;
    $("preview").hidden = false;
  }
}

function addResult(body) {
  const gallery = $("gallery");
  $("empty")?.remove();
  body.outputs.forEach((url, index) => {
    const seed = body.seeds[index];
    const figure = document.createElement("figure");
    figure.className = "result";
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener";
    const image = document.createElement("img");
    image.src = url;
    image.alt = `output ${index + 1}, seed ${seed}`;
    image.title = body.prompts?.positive?.[index] || "";
    link.append(image);
    const caption = document.createElement("figcaption");
    const download = document.createElement("a");
    download.href = url;
    download.download = `beyond-${body.request_id}-${index}.jpg`;
    download.textContent = "download";
    const seedText = document.createElement("span");
    seedText.className = "seed";
    seedText.textContent = `seed ${seed}`;
    caption.append(seedText, ` · ${body.width}×${body.height} · `, download);
    figure.append(link, caption);
    gallery.prepend(figure);
  });
}

async function follow(id, signal) {
  const response = await fetch(`v2/requests/${encodeURIComponent(id)}/events`, { headers: authHeaders(), signal });
  if (!response.ok) throw await apiError(response);
  for await (const event of readEvents(response.body)) {
    if (event.event === "status") showStatus(JSON.parse(event.data));
    else if (event.event === "result") return JSON.parse(event.data);
  }
  throw new Error("The event stream ended before the result came.");
}

async function run(event) {
  event.preventDefault();
  clearError();
  if (!state.input) {
    showError("input_image: choose, drop or link an image first");
    return;
  }
  const controller = new AbortController();
  state.run = { id: null, controller };
  $("submit").disabled = true;
  $("cancel").hidden = false;
  $("run").hidden = false;
  $("preview").hidden = true;
  $("progress").value = 0;
  $("status").textContent = "submitting…";
  try {
    const job = await api("v2/seg-beyond", { method: "POST", body: JSON.stringify(requestBody()), signal: controller.signal });
    state.run.id = job.request_id;
    const result = await follow(job.request_id, controller.signal);
    if (result.status === "COMPLETED") {
      $("progress").value = 1;
      const seconds = result.metrics?.total_time;
      $("status").textContent = typeof seconds === "number" ? `done in ${seconds.toFixed(1)} s` : "done";
      addResult(result);
    } else {
      $("status").textContent = result.status || "failed";
      showError(result.error || `The request ended ${result.status}.`);
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      $("status").textContent = "";
      showError(error.message);
    }
  } finally {
    state.run = null;
    $("submit").disabled = false;
    $("cancel").hidden = true;
  }
}

async function cancel() {
  const current = state.run;
  if (!current) return;
  if (current.id) {
    try {
      await api(`v2/requests/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
      return; // the event stream brings the FAILED "cancelled" result
    } catch (error) {
      showError(error.message);
    }
  }
  current.controller.abort();
  $("status").textContent = "cancelled";
}

// ---------------------------------------------------------------- start

function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => {
    if (apiKey()) localStorage.setItem(KEY_STORAGE, apiKey());
    else localStorage.removeItem(KEY_STORAGE);
  });
  key.addEventListener("change", loadLoras); // a server with keys lists its LoRAs to keys only
  $("add-lora").addEventListener("click", addLora);
  $("file").addEventListener("change", () => useFile($("file").files[0]));
  $("use-url").addEventListener("click", () => useUrl($("url").value));
  $("url").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      useUrl($("url").value);
    }
  });
  $("form").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  setUpCanvas();
  draw();
  loadOptions();
}

start();
