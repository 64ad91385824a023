// InstantID playground: builds its form from GET v1/options (the request model's JSON schema), submits to
// POST v1/jobs, polls GET v1/jobs/{id} for progress, shows results by their links that expire (a response's `urls`)
// and offers them for download through GET v1/outputs.
// Plain JavaScript, no build step, no third-party code: the page works offline against a local server.
"use strict";

// Where the well-known fields go and what they are called; any other field of the request model lands in
// "More options", rendered from its schema, so new server fields appear without changes here.
const LAYOUT = [
  ["face_image", "Face photo(s)"], ["identities", "People (several, instead of the face photo)"],
  ["pose_image", "Pose photo (optional)"],
  ["prompt", "Prompt"], ["negative_prompt", "Negative prompt"], ["style", "Style"],
  ["width", "Width"], ["height", "Height"],
  ["identitynet_strength", "IdentityNet strength"], ["adapter_strength", "Adapter strength"],
  ["steps", "Steps"], ["guidance", "Guidance"], ["scheduler", "Scheduler"], ["seed", "Seed"],
  ["num_images", "Number of images"], ["enhance_face_region", "Enhance face region"],
];
const ROW_LABELS = { identities: "Person" };  // one row of a list, where the label's plural is not "s"
const MORE_LABELS = { output: "Output", loras: "LoRAs", controls: "ControlNets", face_index: "Face index" };
const LABELS = Object.fromEntries(LAYOUT);
const SLIDERS = new Set(["identitynet_strength", "adapter_strength", "steps", "guidance"]);
const POLL_MS = 250, POLL_MAX_MS = 2000;

const $ = (id) => document.getElementById(id);
const state = { options: null, schema: null, job: null, cancelled: false, cancelling: null, abort: null };

// ---------------------------------------------------------------------------------------------- schema helpers
function resolve(node) {
  // Follow $ref into $defs, fold `anyOf: [X, null]` into X with `nullable`.
  let out = node || {};
  if (out.$ref) out = { ...state.schema.$defs[out.$ref.split("/").pop()], ...withoutKey(out, "$ref") };
  if (out.anyOf) {
    const parts = out.anyOf.map(resolve);
    const real = parts.filter((p) => p.type !== "null");
    const base = real.find((p) => p.type !== "array") || real[0] || {};
    out = { ...base, ...withoutKey(out, "anyOf"), nullable: parts.length !== real.length,
            allowsArray: real.find((p) => p.type === "array") || null };
  }
  return out;
}
function withoutKey(obj, key) { const copy = { ...obj }; delete copy[key]; return copy; }
const isImageField = (name) => /(^|_)image$/.test(name.split(".").pop());
const isNumberTuple = (schema) => schema.type === "array" && Array.isArray(schema.prefixItems)
  && schema.prefixItems.every((item) => ["number", "integer"].includes(resolve(item).type));
const humanize = (name) => name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

// ---------------------------------------------------------------------------------------------- rendering
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k === "text") node.textContent = v; else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function fieldId(name) { return "f-" + name.replace(/[^A-Za-z0-9_-]/g, "-"); }

function renderField(name, rawSchema, required) {
  const schema = resolve(rawSchema);
  const id = fieldId(name);
  const label = LABELS[name] || MORE_LABELS[name] || schema.title || humanize(name.split(".").pop());
  const helpId = id + "-help";
  // Image fields get the page's own help: the schema's speaks of base64 and s3://, which an upload hides.
  const help = schema.description && !isImageField(name)
    ? el("p", { class: "help", id: helpId, text: schema.description }) : document.createTextNode("");
  const common = { id, name, "aria-describedby": help.id ? helpId : null, "data-kind": "" };
  const wrap = el("div", { class: "field", "data-field": name });

  if (isImageField(name)) {
    const multiple = Boolean(schema.allowsArray) || schema.type === "array";
    const input = el("input", { ...common, type: "file", accept: "image/*", multiple, required,
                                "data-kind": "image" });
    const thumbs = el("div", { class: "thumbs", "aria-live": "polite" });
    const drop = el("div", { class: "drop" }, input,
                    el("p", { class: "help", text: multiple ? "Drop photos here or choose files; several photos of "
                              + "the same person are averaged." : "Drop a photo here or choose a file." }));
    input.addEventListener("change", () => showThumbs(input, thumbs));
    for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
    for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      const files = [...e.dataTransfer.files];
      const dt = new DataTransfer();
      for (const f of (multiple ? files : files.slice(0, 1))) dt.items.add(f);
      input.files = dt.files;
      input.dispatchEvent(new Event("change"));
    });
    wrap.append(el("label", { for: id, text: label }), drop, thumbs, help);
    return wrap;
  }
  if (schema.type === "object" && schema.properties) {
    const set = el("fieldset", { name, "data-kind": "object" }, el("legend", { text: label }));
    for (const [sub, subSchema] of Object.entries(schema.properties)) {
      set.append(renderField(`${name}.${sub}`, subSchema, (schema.required || []).includes(sub)));
    }
    set.append(help);
    return set;
  }
  if (schema.type === "array" && resolve(schema.items).type === "object") return renderList(name, schema, label, help);
  if (isNumberTuple(schema)) {
    // A box (x1, y1, x2, y2) and the like: one number box per element, in a row.
    const names = schema.prefixItems.length === 4 ? ["x1", "y1", "x2", "y2"] : schema.prefixItems.map((_, i) => i);
    const group = el("div", { class: "row numbers", name, "data-kind": "numbers", role: "group",
                              "aria-label": label });
    names.forEach((part, i) => group.append(el("input", { id: i ? null : id, type: "number", step: "any",
                                                          "aria-label": `${label} ${part}`, placeholder: String(part),
                                                          "data-part": String(i) })));
    wrap.append(el("label", { for: id, text: label }), group, help);
    return wrap;
  }
  if (schema.enum) {
    const select = el("select", { ...common, "data-kind": "enum" });
    if (schema.nullable) {
      const fallback = name === "scheduler" ? `Server default (${state.options.default_scheduler})` : "Server default";
      select.append(el("option", { value: "", text: fallback }));
    }
    for (const value of schema.enum) select.append(el("option", { value, text: value }));
    if (schema.default !== undefined && schema.default !== null) select.value = schema.default;
    wrap.append(el("label", { for: id, text: label }), select, help);
    return wrap;
  }
  if (schema.type === "boolean") {
    const box = el("input", { ...common, type: "checkbox", "data-kind": "boolean", checked: schema.default === true });
    wrap.classList.add("check");
    wrap.append(box, document.createTextNode(" "), el("label", { for: id, text: label }), help);
    return wrap;
  }
  if (name === "seed") {
    // Seeds reach 2^63: kept as text (a JS number is exact only to 2^53) and sent as a bare JSON integer.
    const input = el("input", { ...common, type: "text", inputmode: "numeric", pattern: "[0-9]*", autocomplete: "off",
                                placeholder: "random", "data-kind": "seed" });
    const random = el("button", { type: "button", id: "seed-random", text: "Random" });
    random.addEventListener("click", () => { input.value = String(Math.floor(Math.random() * 2 ** 32)); });
    wrap.append(el("label", { for: id, text: label }), el("div", { class: "row" }, input, random), help);
    return wrap;
  }
  if (schema.type === "integer" || schema.type === "number") {
    const step = schema.type === "integer" ? (name === "width" || name === "height" ? 8 : 1) : 0.05;
    const bounds = { min: schema.minimum ?? schema.exclusiveMinimum, max: schema.maximum ?? schema.exclusiveMaximum,
                     step };
    const initial = schema.default ?? "";
    if (SLIDERS.has(name) && bounds.min !== undefined && bounds.max !== undefined) {
      // A nullable slider (its default depends on other fields) names the number box, which may stay empty:
      // "auto", the server decides. The slider then rests at the usual default.
      const rest = schema.default ?? (state.options.param_defaults || {})[name] ?? (bounds.min + bounds.max) / 2;
      const named = schema.nullable ? { ...common, "data-kind": "number", placeholder: "auto" }
        : { "aria-label": `${label} value` };
      const slider = el("input", { ...(schema.nullable ? { "aria-label": `${label} slider` } : common), type: "range",
                                   ...bounds, value: rest, "data-kind": schema.nullable ? null : "number" });
      const number = el("input", { ...named, type: "number", class: "value", ...bounds, value: initial });
      slider.addEventListener("input", () => { number.value = slider.value; });
      number.addEventListener("input", () => { slider.value = number.value === "" ? rest : number.value; });
      wrap.append(el("label", { for: id, text: label }),
                  el("div", { class: "row" }, slider, number), help);
      return wrap;
    }
    const input = el("input", { ...common, type: "number", ...bounds, value: initial, "data-kind": "number",
                                placeholder: schema.nullable ? "server default" : null });
    wrap.append(el("label", { for: id, text: label }), input, help);
    return wrap;
  }
  const choices = (state.options.choices || {})[name];
  if (schema.type === "string" && choices && choices.length) {
    const select = el("select", { ...common, "data-kind": "enum" });
    for (const value of choices) select.append(el("option", { value, text: value }));
    if (schema.default && choices.includes(schema.default)) select.value = schema.default;
    wrap.append(el("label", { for: id, text: label }), select, help);
    return wrap;
  }
  if (schema.type === "string") {
    const long = name === "prompt" || name === "negative_prompt";
    const input = long ? el("textarea", { ...common, rows: 3, maxlength: schema.maxLength, required, "data-kind": "string" })
      : el("input", { ...common, type: "text", maxlength: schema.maxLength, "data-kind": "string" });
    if (schema.default) input.value = schema.default;
    wrap.append(el("label", { for: id, text: label }), input, help);
    return wrap;
  }
  // Anything else (lists of plain values, free-form objects): JSON text, checked by the server.
  const area = el("textarea", { ...common, rows: 2, "data-kind": "json", placeholder: "JSON, e.g. []" });
  wrap.append(el("label", { for: id, text: `${label} (JSON)` }), area, help);
  return wrap;
}

function renderList(name, schema, label, help) {
  // A list of objects (for example LoRAs or extra controls): rows added on demand, each rendered from the schema.
  const item = resolve(schema.items);
  const set = el("fieldset", { name, "data-kind": "list" }, el("legend", { text: label }));
  const rows = el("div", { class: "list-rows" });
  const one = ROW_LABELS[name] || label.replace(/s$/, "");
  const add = el("button", { type: "button", text: `Add ${one}` });
  let count = 0;
  const addRow = () => {
    const index = count++;
    const row = el("fieldset", { "data-item": String(index) },
                   el("legend", { text: `${ROW_LABELS[name] || label} ${index + 1}` }));
    for (const [sub, subSchema] of Object.entries(item.properties || {})) {
      row.append(renderField(`${name}.${index}.${sub}`, subSchema, (item.required || []).includes(sub)));
    }
    const remove = el("button", { type: "button", text: "Remove" });
    remove.addEventListener("click", () => row.remove());
    row.append(remove);
    rows.append(row);
    return index;
  };
  add.addEventListener("click", addRow);
  set.addRow = addRow;  // "Use these settings" rebuilds the rows of a sidecar
  set.clearRows = () => { rows.replaceChildren(); count = 0; };
  set.append(rows, add, help);
  if (name === "identities") set.append(boxPreview(set));
  return set;
}

function boxPreview(set) {
  // Where each person's box lies on the output (the width and height fields, else a 1024 square), redrawn as the
  // numbers change; overlapping boxes show red (the server refuses them).
  const canvas = el("canvas", { id: "identity-preview", width: 160, height: 160, role: "img",
                                "aria-label": "Preview of the people's boxes on the image" });
  const draw = () => {
    const width = Number($(fieldId("width"))?.value) || 1024, height = Number($(fieldId("height"))?.value) || 1024;
    const scale = 160 / Math.max(width, height);
    canvas.width = Math.round(width * scale); canvas.height = Math.round(height * scale);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#eee"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    const boxes = [...set.querySelectorAll('[data-kind="numbers"][name$=".box"]')].map((group) =>
      [...group.querySelectorAll("input")].map((input) => Number(input.value))).filter((b) => b.every(isFinite)
        && b[2] > b[0] && b[3] > b[1]);
    const overlaps = (a, b) => Math.min(a[2], b[2]) > Math.max(a[0], b[0]) && Math.min(a[3], b[3]) > Math.max(a[1], b[1]);
    boxes.forEach((box, i) => {
      ctx.strokeStyle = boxes.some((other, j) => j !== i && overlaps(box, other)) ? "#c00" : "#06c";
      ctx.lineWidth = 2;
      ctx.strokeRect(box[0] * scale, box[1] * scale, (box[2] - box[0]) * scale, (box[3] - box[1]) * scale);
      ctx.fillStyle = ctx.strokeStyle; ctx.font = "12px sans-serif";
      ctx.fillText(String(i + 1), box[0] * scale + 4, box[1] * scale + 14);
    });
  };
  set.addEventListener("input", draw);
  set.addEventListener("click", () => setTimeout(draw));  // rows added or removed
  setTimeout(() => {  // the size fields are rendered after this list
    for (const side of ["width", "height"]) $(fieldId(side))?.addEventListener("input", draw);
    $("size-preset")?.addEventListener("change", draw);
    draw();
  });
  return el("div", { class: "field" }, el("p", { class: "help", text: "Boxes on the image:" }), canvas);
}

function showThumbs(input, thumbs) {
  thumbs.replaceChildren();
  for (const file of input.files) {
    if (!file.type.startsWith("image/")) continue;
    const url = URL.createObjectURL(file);
    const img = el("img", { src: url, alt: `Selected photo ${file.name}` });
    img.addEventListener("load", () => URL.revokeObjectURL(url));
    thumbs.append(img);
  }
}

function renderSizePresets(container) {
  const presets = state.options.size_presets || [];
  const width = $(fieldId("width")), height = $(fieldId("height"));
  if (!presets.length || !width || !height) return;
  const select = el("select", { id: "size-preset" });
  presets.forEach((p, i) => select.append(el("option", { value: String(i), text: p.label })));
  select.addEventListener("change", () => {
    const p = presets[Number(select.value)];
    width.value = p.width ?? ""; height.value = p.height ?? "";
  });
  const sync = () => {
    const i = presets.findIndex((p) => String(p.width ?? "") === width.value && String(p.height ?? "") === height.value);
    if (i >= 0) select.value = String(i);
  };
  width.addEventListener("input", sync); height.addEventListener("input", sync);
  const wrap = el("div", { class: "field" }, el("label", { for: "size-preset", text: "Size" }), select);
  const pair = el("div", { class: "pair" }, width.closest(".field"), height.closest(".field"));
  container.insertBefore(wrap, container.querySelector('[data-field="identitynet_strength"]'));
  container.insertBefore(pair, wrap.nextSibling);
}

// The safety checker's off switch is offered only where the operator allows it (elsewhere the server answers 400).
const offered = (name) => name !== "safety_checker" || Boolean(state.options.safety?.allow_request_disable);

function buildForm() {
  const props = state.schema.properties;
  const required = state.schema.required || [];
  const main = $("fields"), more = $("advanced-fields");
  for (const [name] of LAYOUT) if (props[name]) main.append(renderField(name, props[name], required.includes(name)));
  for (const [name, schema] of Object.entries(props)) {
    if (!LABELS[name] && offered(name)) more.append(renderField(name, schema, required.includes(name)));
  }
  $("advanced").hidden = !more.children.length;
  renderSizePresets(main);
}

// ---------------------------------------------------------------------------------------------- reading the form
async function readForm() {
  const body = {};
  let seed = null;
  for (const [name, schema] of Object.entries(state.schema.properties)) {
    const value = await readValue(name, schema);
    if (name === "seed") { seed = value; continue; }
    if (value !== undefined) body[name] = value;
  }
  let json = JSON.stringify(body);
  if (seed !== undefined && seed !== null) json = json.slice(0, -1) + (json === "{}" ? "" : ",") + `"seed":${seed}}`;
  return json;
}

async function readValue(name, rawSchema) {
  const schema = resolve(rawSchema);
  const node = document.querySelector(`[name="${CSS.escape(name)}"]`);
  if (!node) return undefined;
  const kind = node.dataset.kind;
  if (kind === "object") {
    const out = {};
    for (const [sub, subSchema] of Object.entries(schema.properties)) {
      const v = await readValue(`${name}.${sub}`, subSchema);
      if (v !== undefined) out[sub] = v;
    }
    // An optional object (a pose preset and its box) is sent only once its required fields are filled: a select
    // showing its default alone asks for nothing.
    if (schema.nullable && (schema.required || []).some((sub) => out[sub] === undefined)) return undefined;
    return Object.keys(out).length ? out : undefined;
  }
  if (kind === "list") {
    const item = resolve(schema.items);
    const out = [];
    for (const row of node.querySelectorAll(":scope > .list-rows > fieldset")) {
      const obj = {};
      for (const [sub, subSchema] of Object.entries(item.properties || {})) {
        const v = await readValue(`${name}.${row.dataset.item}.${sub}`, subSchema);
        if (v !== undefined) obj[sub] = v;
      }
      out.push(obj);
    }
    return out.length ? out : undefined;
  }
  if (kind === "image") {
    const files = [...node.files];
    if (!files.length) return undefined;
    const encoded = await Promise.all(files.map(fileToBase64));
    return node.multiple && encoded.length > 1 ? encoded : encoded[0];
  }
  if (kind === "numbers") {
    const values = [...node.querySelectorAll("input")].map((input) => input.value.trim());
    if (values.every((v) => v === "")) return undefined;
    if (values.some((v) => v === "")) throw new FieldError(name, `${name}: fill in all ${values.length} numbers`);
    return values.map(Number);
  }
  if (kind === "boolean") return node.checked;
  if (kind === "seed") return node.value.trim() === "" ? undefined : node.value.trim();
  if (kind === "number") return node.value === "" ? undefined : Number(node.value);
  if (kind === "enum") return node.value === "" ? undefined : node.value;
  if (kind === "json") {
    if (!node.value.trim()) return undefined;
    try { return JSON.parse(node.value); } catch { throw new FieldError(name, `${name} is not valid JSON`); }
  }
  if (node.value === "" && !(state.schema.required || []).includes(name) && schema.default !== "") return undefined;
  return node.value;
}

// Seeds are 62-bit and a JS number is exact only to 2^53: long integers of a "seed" key are read as strings.
async function readJson(response) {
  return JSON.parse((await response.text()).replace(/("seed"\s*:\s*)(\d{16,})/g, '$1"$2"'));
}

function fileToBase64(file) {
  return new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(file);
  });
}

class FieldError extends Error { constructor(field, message) { super(message); this.field = field; } }

function checkFiles() {
  // The server checks all of this too; checking here saves an upload and names the file.
  const limit = state.options.limits.max_image_bytes;
  for (const input of document.querySelectorAll('input[data-kind="image"]')) {
    for (const file of input.files) {
      if (file.type && !file.type.startsWith("image/")) {
        throw new FieldError(input.name, `"${file.name}" is not an image: choose a JPEG, PNG or WebP photo.`);
      }
      if (file.size > limit) {
        throw new FieldError(input.name, `"${file.name}" is too large (${mb(file.size)}); the limit is ${mb(limit)}: `
          + "choose a smaller photo or resize it.");
      }
    }
  }
  const face = document.querySelector('[name="face_image"]');
  const people = document.querySelectorAll('[name="identities"] .list-rows > fieldset').length;
  if (face && !face.files.length && !people) {
    throw new FieldError("face_image", "Add a face photo (or people): the image is made from it.");
  }
  const prompt = document.querySelector('[name="prompt"]');
  if (prompt && !prompt.value.trim()) throw new FieldError("prompt", "Write a prompt: describe the picture you want.");
  const seed = document.querySelector('[name="seed"]');
  if (seed && seed.value.trim() && !/^\d+$/.test(seed.value.trim())) {
    throw new FieldError("seed", "The seed must be a whole number (or empty for a random one).");
  }
}
const mb = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MB`;

// ---------------------------------------------------------------------------------------------- HTTP
function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function api(method, path, body, signal) {
  let response;
  try {
    response = await fetch(path, { method, body, signal,
                                   headers: headers(body ? { "Content-Type": "application/json" } : {}) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", "Can't reach the server: check that it is running and the network is up, then retry.");
  }
  if (response.ok) return response;
  let detail = {};
  try { detail = (await readJson(response)).error || {}; } catch { /* not our JSON: a proxy's page */ }
  throw new ApiError(response.status, detail.code || "", detail.message || response.statusText, detail.field,
                     Number(response.headers.get("Retry-After")) || null);
}

class ApiError extends Error {
  constructor(status, code, message, field, retryAfter) {
    super(message); Object.assign(this, { status, code, field, retryAfter });
  }
}

// Words that say what to fix, by error code (the server's message follows with the details).
function explain(err) {
  const msg = err.message || "";
  switch (err.code) {
    case "no_face": return `No face found. Use a photo where one face is clearly visible, frontal and well lit. (${msg})`;
    case "image_too_large": return `Image too large: choose a smaller photo or resize it. (${msg})`;
    case "invalid_image": return `Not an image the server can read: choose a JPEG, PNG or WebP photo. (${msg})`;
    case "invalid_parameter": return `Check ${err.field || "the settings"}: ${msg}`;
    case "unauthorized":
      $("key-row").hidden = false;
      return `API key needed or not valid: enter a valid key in the API key field. (${msg})`;
    case "forbidden": return `This API key may not do that: ${msg}`;
    case "stage_timeout": return `The request took too long: try fewer steps, fewer images or a smaller size. (${msg})`;
    case "network": return msg;
  }
  if (err.status === 429 || err.status === 503 || err.code === "overloaded" || err.code === "rate_limited") {
    const wait = err.retryAfter ? `retry in ${err.retryAfter} s` : "retry in a few seconds";
    return `The service is busy: ${wait}. (${msg})`;
  }
  return msg ? `${msg}` : `The server answered ${err.status}: retry, or check the server's logs.`;
}

function showError(err) {
  const box = $("alert");
  box.textContent = err instanceof ApiError ? explain(err)
    : err instanceof FieldError ? err.message : `Something went wrong in the page: ${err.message}`;
  box.hidden = false;
  const field = err.field && document.querySelector(`[name="${CSS.escape(String(err.field).replace(/\[\d+\]$/, ""))}"]`);
  if (field) { field.setAttribute("aria-invalid", "true"); field.focus({ preventScroll: false }); }
}

function clearError() {
  $("alert").hidden = true; $("alert").textContent = "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

// ---------------------------------------------------------------------------------------------- the job
function setProgress(job) {
  const bar = $("progress"), text = $("progress-text");
  const p = job.progress;
  if (p && p.steps) {
    bar.classList.remove("indeterminate");
    bar.setAttribute("aria-valuemax", String(p.steps));
    bar.setAttribute("aria-valuenow", String(p.step));
    bar.setAttribute("aria-valuetext", `step ${p.step} of ${p.steps}`);
    $("progress-fill").style.width = `${Math.min(100, (100 * p.step) / p.steps)}%`;
    text.textContent = `Denoising: step ${p.step} of ${p.steps}`;
  } else {
    bar.classList.add("indeterminate");
    bar.removeAttribute("aria-valuenow");
    bar.setAttribute("aria-valuetext", job.status);
    text.textContent = job.status === "queued" ? "Queued: waiting for a free worker..." : "Generating...";
  }
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = false;
  $("progress-row").hidden = !on;
}

async function submit(event) {
  event.preventDefault();
  clearError();
  $("status").textContent = "";
  let body;
  try { checkFiles(); body = await readForm(); } catch (err) { showError(err); return; }
  busy(true);
  state.cancelled = false;
  setProgress({ status: "queued" });
  if (matchMedia("(max-width: 760px)").matches) $("progress-row").scrollIntoView({ block: "nearest" });  // one column
  try {
    if (state.options.jobs === false) {
      await generateNow(body);
    } else {
      const job = await readJson(await api("POST", "v1/jobs", body));
      state.job = job.job_id;
      if (state.cancelled) state.cancelling = cancelJob(job.job_id);  // Cancel was pressed while submitting
      else await poll(job.job_id);
    }
  } catch (err) {
    if (err instanceof ApiError && err.code === "jobs_disabled") {
      state.options.jobs = false;  // this server runs no job queue: the same request, synchronously
      clearError();
      try { await generateNow(body); } catch (again) { showError(again); }
    } else if (!(err instanceof DOMException && err.name === "AbortError")) {
      showError(err);
    }
  } finally {
    if (state.cancelling) await state.cancelling;
    state.job = null;
    state.cancelling = null;
    state.abort = null;
    busy(false);
  }
}

async function generateNow(body) {
  // Without the jobs API: POST /v1/generate; no step count to show, and Cancel drops the request (the server
  // stops a dropped request at its next denoising step).
  state.abort = new AbortController();
  setProgress({ status: "running" });
  const response = await api("POST", "v1/generate", body, state.abort.signal);
  await showResult(await readJson(response));
}

async function poll(jobId) {
  // Quick polls first (a job on a free server takes seconds), slower later: a key's rate limit counts polls too.
  let wait = POLL_MS;
  for (;;) {
    if (state.cancelled) return;
    let job;
    try {
      job = await readJson(await api("GET", `v1/jobs/${encodeURIComponent(jobId)}`));
    } catch (err) {
      if (!(err instanceof ApiError) || (err.status !== 429 && err.status !== 503)) throw err;
      const retry = err.retryAfter || 2;
      $("progress-text").textContent = `The service is busy: checking again in ${retry} s...`;
      await new Promise((ok) => setTimeout(ok, retry * 1000));
      continue;
    }
    if (state.cancelled) return;
    if (job.status === "done") {
      const steps = Number($("progress").getAttribute("aria-valuenow") !== null && $("progress").getAttribute("aria-valuemax"));
      if (steps) setProgress({ ...job, progress: { step: steps, steps } });  // the bar ends full
      await showResult(job.result);
      return;
    }
    if (job.status === "failed") {
      const e = job.error || {};
      throw new ApiError(0, e.code || "", e.message || "the job failed", e.field);
    }
    if (job.status === "cancelled") { $("status").textContent = "Cancelled."; return; }
    setProgress(job);
    await new Promise((ok) => setTimeout(ok, wait));
    wait = Math.min(POLL_MAX_MS, wait * 1.25);
  }
}

function cancel() {
  state.cancelled = true;
  $("cancel").disabled = true;
  $("status").textContent = "Cancelling...";
  if (state.job) state.cancelling = cancelJob(state.job);
  if (state.abort) { state.abort.abort(); $("status").textContent = "Cancelled."; }
}

async function cancelJob(jobId) {
  try {
    await api("DELETE", `v1/jobs/${encodeURIComponent(jobId)}`);
    $("status").textContent = "Cancelled.";
  } catch (err) {
    $("status").textContent = err.status === 404 || err.status === 405
      ? "Stopped waiting; this server cannot cancel jobs, so it finishes in the background."
      : `Stopped waiting, but the cancel request failed: ${explain(err)}`;
  }
}

// ---------------------------------------------------------------------------------------------- results
async function fetchOutput(uri) {
  return api("GET", `v1/outputs?uri=${encodeURIComponent(uri)}`);
}

async function showResult(result) {
  const figures = [];
  for (const [index, uri] of result.images.entries()) {
    // The download is a blob: the link may be another origin's (a presigned S3 URL), where `download` is ignored.
    const blob = await (await fetchOutput(uri)).blob();
    const url = URL.createObjectURL(blob);
    const link = (result.urls || [])[index];
    const ext = uri.split(".").pop();
    const name = `instantid-${result.request_id}-${index}.${ext}`;
    const useSettings = el("button", { type: "button", class: "use-settings", text: "Use these settings" });
    useSettings.addEventListener("click", () => useSidecar(result.metadata).catch(showError));
    figures.push(el("figure", { "data-request-id": result.request_id, "data-seed": String(result.seed) },
      el("img", { src: link || url, alt: `Result ${index + 1} of request ${result.request_id}, seed ${result.seed}`,
                  width: result.width, height: result.height }),
      el("figcaption", {}, document.createTextNode(`${result.width} x ${result.height}, seed ${result.seed}`),
         el("div", { class: "links" }, el("a", { href: url, download: name, text: "Download" }), useSettings))));
  }
  $("results").prepend(...figures);
  $("status").textContent = `Done: ${result.images.length} image(s) in ${((result.timings_ms || {}).total / 1000 || 0).toFixed(1)} s.`;
}

async function useSidecar(metaUri) {
  clearError();
  const meta = await readJson(await fetchOutput(metaUri));
  const params = { ...(meta.params || {}), seed: meta.seed ?? (meta.params || {}).seed };
  fill("", params);
  if (params.width && params.height) $(fieldId("width")).dispatchEvent(new Event("input"));
  $("status").textContent = `Settings of request ${meta.request_id} loaded (seed ${params.seed}); the photos stay `
    + "as selected.";
  $("generate").focus();
}

function fill(prefix, params) {
  for (const [key, value] of Object.entries(params)) {
    const name = prefix + key;
    const node = document.querySelector(`[name="${CSS.escape(name)}"]`);
    if (!node || node.dataset.kind === "image") continue;
    const kind = node.dataset.kind;
    if (kind === "object" && value && typeof value === "object") { fill(name + ".", value); continue; }
    if (kind === "boolean") node.checked = Boolean(value);
    else if (kind === "numbers") {
      const parts = Array.isArray(value) ? value : [];
      node.querySelectorAll("input").forEach((input, i) => { input.value = parts[i] ?? ""; });
      node.dispatchEvent(new Event("input", { bubbles: true }));  // the box preview redraws
      continue;
    }
    else if (kind === "json") node.value = value === null ? "" : JSON.stringify(value);
    else if (kind === "list") {
      node.clearRows();
      for (const item of Array.isArray(value) ? value : []) fill(`${name}.${node.addRow()}.`, item || {});
      continue;
    }
    else node.value = value === null || value === undefined ? "" : String(value);
    node.dispatchEvent(new Event("input"));
  }
}

// ---------------------------------------------------------------------------------------------- start
async function start() {
  try {
    const options = await readJson(await api("GET", "v1/options"));
    state.options = options;
    state.schema = options.request_schema;
    if (options.notice) {  // the tiny preset: say that its images are noise, and how to serve real weights
      $("tiny-preset-notice").textContent = options.notice;
      $("tiny-preset-notice").hidden = false;
    }
    $("key-row").hidden = !options.api_key_required;
    buildForm();
    $("loading").remove();
    $("generate").disabled = false;
  } catch (err) {
    $("loading").textContent = "";
    showError(err);
  }
}

$("generate-form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
start();
