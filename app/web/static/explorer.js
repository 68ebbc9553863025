// The latent-space explorer: draw or upload a digit, see its reconstruction, posterior and scores; move
// its code with one slider per dimension; traverse, edit, sample, interpolate, and browse the test set's map;
// pick the model all of that runs on, or compare one drawing across every model.
import { ApiError, apiKey, call, canvasBlob, setApiKey } from "./api.js";
import { compareModels } from "./compare.js";
import { fillModelPicker, initialModel, listModels, modelPath } from "./models.js";
import { $, clearImage, describeError, showBlob, upload, verdictParagraphs } from "./view.js";

const SLIDER_RANGE = 4; // sliders span -4..4 in latent units
const DEBOUNCE_MS = 25;
const LABEL_COLOURS = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

const state = {
  modelName: null, // the picked model; null: the default model of a service without GET /models
  modelGeneration: 0, // bumped whenever the picked model changes: answers for an older one are dropped
  model: null, // GET /models/{name} (or GET /model)
  drawn: false, // whether the pad holds a drawing, analysed again when another model is picked
  code: null, // the current latent code, Array of latent_dim numbers
  ends: { start: null, end: null }, // interpolation ends, PNG Blobs
  map: null, // GET /latent-map
  frame: null, // the map's bounds, computed once per map
  cursor: [0, 0], // the map's keyboard cursor, in map coordinates
  codeVersion: 0, // bumped whenever state.code changes: answers for an older code are dropped
  tokens: {}, // latest-wins tokens per output (samples, strip)
};

function setCode(code) {
  state.code = code;
  state.codeVersion += 1;
}

// A token for one output; `isLatest(name, token)` is false once a newer request for it has started.
function nextToken(name) {
  state.tokens[name] = (state.tokens[name] || 0) + 1;
  return state.tokens[name];
}

const isLatest = (name, token) => state.tokens[name] === token;

// An answer for a model that is no longer picked: dropped, not shown.
class Superseded extends Error {}

// One call to the picked model's routes; its answer (or error) is a Superseded once another model is picked.
async function modelCall(route, options) {
  const generation = state.modelGeneration;
  let answer;
  let failure = null;
  try {
    answer = await call(modelPath(state.modelName, route), options);
  } catch (error) {
    failure = error;
  }
  if (generation !== state.modelGeneration) throw new Superseded(route);
  if (failure) throw failure;
  return answer;
}

// --- errors and images ---------------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  box.textContent = describeError(error);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Run an action; show its error on the page instead of failing silently.
async function guarded(action) {
  try {
    const result = await action();
    clearError();
    return result;
  } catch (error) {
    if (!(error instanceof Superseded)) showError(error);
    return undefined;
  }
}

// Latest-wins debouncing: only the last call in a burst runs, and only its answer is shown.
function debounced(action) {
  let timer = null;
  let generation = 0;
  return (...args) => {
    clearTimeout(timer);
    const mine = ++generation;
    timer = setTimeout(() => guarded(() => action(() => mine === generation, ...args)), DEBOUNCE_MS);
  };
}

// --- the model and its controls ------------------------------------------------------------------

function fillSelect(select, values, first) {
  select.replaceChildren();
  for (const [value, text] of first ? [first, ...values.map((v) => [v, v])] : values.map((v) => [v, v])) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.append(option);
  }
}

async function loadModel() {
  const model = await modelCall("/model");
  state.model = model;
  const manifest = model.manifest;
  const space = model.latent_space;
  $("model-name").textContent =
    `${manifest.name} ${manifest.version}: ${manifest.latent_dim} latent dimensions, on ${model.provider}`;
  fillSelect($("prior"), space.priors);
  $("prior").value = space.default_prior;
  fillSelect($("label"), space.labels || [], ["", "any (use the prior)"]);
  fillSelect($("to-label"), space.labels || [], ["", "choose"]);
  fillSelect($("attribute"), (space.attributes || []).map((a) => a.name), ["", "choose"]);
  const attributes = space.attributes || [];
  const labels = space.labels || [];
  for (const [id, usable] of [["attribute", attributes.length], ["attribute-amount", attributes.length],
    ["to-label", labels.length], ["label-amount", labels.length], ["label", labels.length]]) {
    $(id).disabled = !usable; // a model without them offers no such edits or samples
  }
  $("count").max = model.limits.max_sample_n;
  $("steps").max = model.limits.max_interpolation_steps;
  buildSliders(manifest.latent_dim);
  setCode(new Array(manifest.latent_dim).fill(0));
  setSliders(state.code);
  await decodeCode(() => true);
}

// Posterior samples per /score call: 16, or less where the service's limits allow less.
function scoreSamples() {
  if (!state.model) return 16; // a model is being picked: its limits are not known yet
  const { limits, batching } = state.model;
  const decodes = Math.min(limits.max_score_decodes, batching.max_queue_items);
  return Math.max(1, Math.min(16, limits.max_score_samples, decodes - 1));
}

function buildSliders(latentDim) {
  const box = $("sliders");
  box.replaceChildren();
  for (let dim = 0; dim < latentDim; dim++) {
    const label = document.createElement("label");
    label.htmlFor = `z${dim}`;
    label.textContent = `z${dim}`;
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", id: `z${dim}`, min: -SLIDER_RANGE, max: SLIDER_RANGE, step: 0.05 });
    slider.dataset.dim = dim;
    const value = document.createElement("output");
    value.id = `z${dim}-value`;
    value.htmlFor = slider.id;
    slider.addEventListener("input", () => {
      const code = state.code.slice();
      code[dim] = Number(slider.value);
      setCode(code);
      value.textContent = Number(slider.value).toFixed(2);
      scheduleDecode();
      drawMap();
    });
    box.append(label, slider, value);
  }
}

function setSliders(code) {
  code.forEach((value, dim) => {
    const slider = $(`z${dim}`);
    slider.value = value;
    $(`z${dim}-value`).textContent = Number(value).toFixed(2);
  });
}

// --- decoding the code ---------------------------------------------------------------------------

async function decodeCode(current) {
  const started = performance.now();
  const version = state.codeVersion;
  const blob = await modelCall("/decode", { method: "POST", json: { latents: [state.code] }, accept: "image/png" });
  if (!current() || version !== state.codeVersion) return; // the code moved on meanwhile
  const elapsed = performance.now() - started;
  showBlob($("decoded"), blob);
  $("decoded").dataset.ms = elapsed.toFixed(1);
  $("decoded-caption").textContent = `decoded code (${elapsed.toFixed(0)} ms)`;
}

const scheduleDecode = debounced(decodeCode);

// --- drawing -------------------------------------------------------------------------------------

function setUpPad() {
  const pad = $("pad");
  const context = pad.getContext("2d");
  const clear = () => {
    context.fillStyle = "#000";
    context.fillRect(0, 0, pad.width, pad.height);
  };
  clear();
  let last = null; // the drawing pointer's last point
  let drawingPointer = null; // one pointer draws at a time: a second finger is ignored
  const point = (event) => {
    const box = pad.getBoundingClientRect();
    return [((event.clientX - box.left) * pad.width) / box.width, ((event.clientY - box.top) * pad.height) / box.height];
  };
  const line = (from, to) => {
    Object.assign(context, { strokeStyle: "#fff", lineWidth: 20, lineCap: "round", lineJoin: "round" });
    context.beginPath();
    context.moveTo(...from);
    context.lineTo(...to);
    context.stroke();
  };
  pad.addEventListener("pointerdown", (event) => {
    if (drawingPointer !== null || event.button !== 0) return; // primary button, pen tip or finger only
    drawingPointer = event.pointerId;
    pad.setPointerCapture(event.pointerId);
    last = point(event);
    line(last, last); // a tap leaves a dot
  });
  pad.addEventListener("pointermove", (event) => {
    if (event.pointerId !== drawingPointer) return;
    const next = point(event);
    line(last, next);
    last = next;
  });
  const finish = (event) => {
    if (event.pointerId !== drawingPointer) return;
    drawingPointer = null;
    last = null;
    analyseDrawing();
  };
  pad.addEventListener("pointerup", finish);
  pad.addEventListener("pointercancel", finish);
  $("clear").addEventListener("click", () => {
    clear();
    state.drawn = false;
  });
  const drawFile = async (file) => {
    const bitmap = await createImageBitmap(file);
    clear();
    context.drawImage(bitmap, 0, 0, pad.width, pad.height);
    analyseDrawing();
  };
  $("upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = ""; // choosing the same file again is a change too
    if (file) guarded(() => drawFile(file));
  });
  // A file dropped anywhere but the pad must not make the browser leave the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  pad.addEventListener("drop", (event) => {
    const file = event.dataTransfer.files[0];
    if (file) guarded(() => drawFile(file));
  });
}

const analyseDrawing = debounced(async (current) => {
  state.drawn = true;
  const drawing = await canvasBlob($("pad"));
  const version = state.codeVersion;
  // The score is asked for on its own: a model or limits that refuse it still show everything else.
  const scored = modelCall(`/score?k=${scoreSamples()}&seed=0`, { method: "POST", form: upload(drawing) })
    .then((scores) => ({ score: scores.items[0] }), (error) => ({ error })); // never an unhandled rejection
  const [encoded, reconstruction] = await Promise.all([
    modelCall("/encode", { method: "POST", form: upload(drawing) }),
    modelCall("/reconstruct", { method: "POST", form: upload(drawing), accept: "image/png" }),
  ]);
  if (!current()) return;
  const item = encoded.items[0];
  showBlob($("reconstruction"), reconstruction);
  drawPosterior(item.mean, item.std);
  scored.then(({ score, error }) => current() && !(error instanceof Superseded) && showVerdict(score, error));
  if (version === state.codeVersion) { // unless the user moved the code meanwhile, it becomes the drawing's
    setCode(item.mean.slice());
    setSliders(state.code);
    drawMap();
  }
  await Promise.all([decodeCode(current), traverse()]);
});

function drawPosterior(mean, std) {
  const box = $("posterior");
  box.replaceChildren();
  const values = mean.map((m, dim) => `z${dim} ${m.toFixed(2)} plus or minus ${std[dim].toFixed(2)}`);
  box.setAttribute("aria-label", `Posterior mean and standard deviation: ${values.join("; ")}`);
  const position = (value) => `${Math.min(100, Math.max(0, 50 + (value / SLIDER_RANGE) * 50))}%`;
  mean.forEach((m, dim) => {
    const label = document.createElement("span");
    label.textContent = `z${dim}`;
    const track = document.createElement("div");
    track.className = "track";
    track.title = `z${dim}: ${m.toFixed(2)} \u00b1 ${std[dim].toFixed(2)}`;
    const zero = document.createElement("span");
    zero.className = "zero";
    const spread = document.createElement("span");
    spread.className = "spread";
    spread.style.left = position(m - std[dim]);
    spread.style.right = `calc(100% - ${position(m + std[dim])})`;
    const bar = document.createElement("span");
    bar.className = "mean";
    bar.style.left = position(m);
    track.append(zero, spread, bar);
    box.append(label, track);
  });
}

function showVerdict(score, error) {
  const box = $("verdict");
  if (error) {
    const problem = document.createElement("p");
    problem.textContent = `no scores: ${error instanceof ApiError ? error.detail : error}`;
    box.replaceChildren(problem);
  } else {
    box.replaceChildren(...verdictParagraphs(score));
  }
}

// --- traversals and edits ------------------------------------------------------------------------

async function traverse() {
  const version = state.codeVersion;
  const token = nextToken("traversal");
  const blob = await modelCall("/traverse?steps=9", { method: "POST", json: { latent: state.code }, accept: "image/png" });
  if (version === state.codeVersion && isLatest("traversal", token)) showBlob($("traversal"), blob);
}

const scheduleEdit = debounced(async (current, kind) => {
  const select = kind === "attribute" ? $("attribute") : $("to-label");
  const amount = kind === "attribute" ? $("attribute-amount").value : $("label-amount").value;
  if (!select.value) throw new Error(`choose ${kind === "attribute" ? "an attribute" : "a label"} first`);
  const parameter = kind === "attribute" ? "attribute" : "to_label";
  const query = `${parameter}=${encodeURIComponent(select.value)}&amounts=${amount}`;
  const blob = await modelCall(`/edit?${query}`, { method: "POST", json: { latent: state.code }, accept: "image/png" });
  if (current()) showBlob($("edited"), blob);
});

// --- sampling ------------------------------------------------------------------------------------

async function sample() {
  const query = new URLSearchParams({ n: $("count").value, seed: $("seed").value, temperature: $("temperature").value });
  // A label samples that label's own density; otherwise the chosen prior.
  if ($("label").value) query.set("label", $("label").value);
  else query.set("prior", $("prior").value);
  const token = nextToken("samples");
  const blob = await modelCall(`/sample?${query}`, { accept: "image/png" });
  if (!isLatest("samples", token)) return;
  const link = $("download");
  link.href = showBlob($("samples"), blob);
  link.hidden = false;
}

// --- interpolation -------------------------------------------------------------------------------

async function setEnd(name, blob) {
  if (!blob) throw new Error("draw or upload a digit first");
  state.ends[name] = blob;
  showBlob($(`${name}-image`), blob);
}

async function interpolate() {
  if (!state.ends.start || !state.ends.end) throw new Error("choose a start and an end image first");
  const form = new FormData();
  form.append("start", state.ends.start, "start.png");
  form.append("end", state.ends.end, "end.png");
  form.append("steps", $("steps").value);
  form.append("method", $("method").value);
  const token = nextToken("strip");
  const strip = await modelCall(`/interpolate?columns=${$("steps").value}`, { method: "POST", form, accept: "image/png" });
  if (isLatest("strip", token)) showBlob($("strip"), strip);
}

// --- the map -------------------------------------------------------------------------------------

// The map's bounds with a margin, worked out once per map (a loop: spreading many points into Math.min fails).
function frameOf(points) {
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of points) {
    [x0, x1, y0, y1] = [Math.min(x0, x), Math.max(x1, x), Math.min(y0, y), Math.max(y1, y)];
  }
  const margin = 0.08;
  const width = x1 - x0 || 1;
  const height = y1 - y0 || 1;
  return { x0: x0 - margin * width, y0: y0 - margin * height, width: width * (1 + 2 * margin), height: height * (1 + 2 * margin) };
}

const mapFrame = () => state.frame;

function toCanvas(frame, canvas, [x, y]) {
  return [((x - frame.x0) / frame.width) * canvas.width, (1 - (y - frame.y0) / frame.height) * canvas.height];
}

function fromCanvas(frame, canvas, [u, v]) {
  return [frame.x0 + (u / canvas.width) * frame.width, frame.y0 + (1 - v / canvas.height) * frame.height];
}

function project(code) {
  const { mean, components } = state.map;
  return components.map((axis) => axis.reduce((sum, weight, dim) => sum + weight * (code[dim] - mean[dim]), 0));
}

function drawMap() {
  if (!state.map) return;
  const canvas = $("map");
  const context = canvas.getContext("2d");
  const frame = mapFrame();
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  state.map.points.forEach((point, index) => {
    const label = state.map.labels[index];
    context.fillStyle = label >= 0 ? LABEL_COLOURS[label % LABEL_COLOURS.length] : "#888";
    const [u, v] = toCanvas(frame, canvas, point);
    context.fillRect(u - 2, v - 2, 4, 4);
  });
  const marks = [[project(state.code), "#000", 9]];
  if (document.activeElement === canvas) marks.push([state.cursor, "#2563eb", 6]);
  for (const [where, colour, size] of marks) {
    const [u, v] = toCanvas(frame, canvas, where);
    Object.assign(context, { strokeStyle: colour, lineWidth: 2 });
    context.beginPath();
    context.moveTo(u - size, v);
    context.lineTo(u + size, v);
    context.moveTo(u, v - size);
    context.lineTo(u, v + size);
    context.stroke();
  }
}

function decodeMapPoint([x, y]) {
  const { mean, components } = state.map;
  setCode(mean.map((m, dim) => m + x * components[0][dim] + y * components[1][dim]));
  setSliders(state.code);
  drawMap();
  scheduleDecode();
}

async function loadMap() {
  try {
    state.map = await modelCall("/latent-map");
  } catch (error) {
    if (error instanceof ApiError && error.status === 422) {
      $("legend").textContent = error.detail; // this model ships no map: say so in place
      return;
    }
    throw error;
  }
  state.frame = frameOf(state.map.points);
  state.cursor = [0, 0];
  const legend = $("legend");
  legend.replaceChildren();
  state.map.label_names.forEach((name, index) => {
    const entry = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = LABEL_COLOURS[index % LABEL_COLOURS.length];
    entry.append(swatch, name);
    legend.append(entry);
  });
  drawMap();
}

function setUpMap() {
  const canvas = $("map");
  canvas.addEventListener("click", (event) => {
    if (!state.map) return;
    const box = canvas.getBoundingClientRect();
    const u = ((event.clientX - box.left) * canvas.width) / box.width;
    const v = ((event.clientY - box.top) * canvas.height) / box.height;
    state.cursor = fromCanvas(mapFrame(), canvas, [u, v]);
    decodeMapPoint(state.cursor);
  });
  canvas.addEventListener("keydown", (event) => {
    if (!state.map) return;
    const frame = mapFrame();
    const step = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, 1], ArrowDown: [0, -1] }[event.key];
    if (step) {
      event.preventDefault();
      state.cursor = [state.cursor[0] + (step[0] * frame.width) / 40, state.cursor[1] + (step[1] * frame.height) / 40];
      drawMap();
    } else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      decodeMapPoint(state.cursor);
    }
  });
  canvas.addEventListener("focus", drawMap);
  canvas.addEventListener("blur", drawMap);
}

// --- the model picker ----------------------------------------------------------------------------

// Empty what the previous model drew, so that nothing on the page belongs to another model.
function clearModelOutputs() {
  for (const id of ["reconstruction", "decoded", "traversal", "edited", "samples", "strip"]) clearImage($(id));
  $("download").hidden = true;
  $("verdict").textContent = "Draw something to see its scores.";
  $("posterior").replaceChildren();
  state.map = null;
  state.frame = null;
  const map = $("map");
  map.getContext("2d").clearRect(0, 0, map.width, map.height);
  $("legend").replaceChildren();
}

// Run the page on one model: its limits, priors, labels and attributes, its code, map and samples, and
// the drawing on the pad again.
async function useModel(name) {
  state.modelName = name;
  state.modelGeneration += 1;
  const generation = state.modelGeneration;
  state.model = null;
  clearModelOutputs();
  await guarded(loadModel);
  if (!state.model || generation !== state.modelGeneration) return; // the error is shown, or superseded
  await Promise.all([guarded(loadMap), guarded(sample)]);
  if (state.drawn && generation === state.modelGeneration) analyseDrawing();
}

// --- wiring --------------------------------------------------------------------------------------

async function start() {
  state.model = null;
  const listing = await guarded(listModels); // null: a service without GET /models
  if (listing === undefined) return; // the error is shown: a missing or wrong API key, say
  $("model-picker").hidden = listing === null;
  $("compare-section").hidden = listing === null;
  let name = null;
  if (listing !== null) {
    name = initialModel(listing);
    if (name === null) {
      showError(new Error("no model is ready yet; GET /models says why, and reloading the page tries again"));
      return;
    }
    fillModelPicker($("model"), listing, name);
  }
  await useModel(name);
}

function compareWith(image) {
  return guarded(() => compareModels(image, scoreSamples()));
}

function init() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("api-key").value.trim());
    start();
  });
  setUpPad();
  setUpMap();
  $("traverse").addEventListener("click", () => guarded(traverse));
  $("attribute").addEventListener("change", () => scheduleEdit("attribute"));
  $("attribute-amount").addEventListener("input", () => {
    $("attribute-value").textContent = $("attribute-amount").value;
    scheduleEdit("attribute");
  });
  $("to-label").addEventListener("change", () => scheduleEdit("label"));
  $("label-amount").addEventListener("input", () => {
    $("label-value").textContent = $("label-amount").value;
    scheduleEdit("label");
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = $("temperature").value;
  });
  $("sample-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(sample);
  });
  $("reroll").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 1_000_000);
    guarded(sample);
  });
  for (const name of ["start", "end"]) { // the pad as it is now, not as it was last analysed
    $(`use-${name}`).addEventListener("click", () => guarded(async () => setEnd(name, await canvasBlob($("pad")))));
  }
  for (const name of ["start", "end"]) {
    $(`${name}-upload`).addEventListener("change", (event) => {
      const file = event.target.files[0];
      event.target.value = "";
      if (file) guarded(() => setEnd(name, file));
    });
  }
  $("interpolate").addEventListener("click", () => guarded(interpolate));
  $("model").addEventListener("change", () => useModel($("model").value));
  $("compare").addEventListener("click", async () => compareWith(await canvasBlob($("pad"))));
  $("compare-upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = "";
    if (file) compareWith(file);
  });
  start();
}

init();
