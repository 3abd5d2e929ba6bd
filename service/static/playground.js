// The VAE playground. It calls this service's own API (GET /model and /sample; POST /encode, /decode, /kl,
// /reconstruct and /interpolate) from the browser and draws what comes back. Plain JavaScript: no build
// step, no dependencies.

// Prior samples decoded and encoded again to find the latent dimensions the encoder uses (inactive
// dimensions have mu = 0 whatever the image); the sliders go on the ones whose mu varies most.
const PROBE_COUNT = 32;
const PROBE_SEED = 0;
// The model card's active-unit threshold on the variance of mu (Burda et al., 2016).
const ACTIVE_VARIANCE = 0.01;
const MIN_SLIDERS = 2;
const MAX_SLIDERS = 8;
// Slider range, in prior standard deviations either side of 0.
const SLIDER_RANGE = 3;
// The side in pixels that PNGs are asked for (the API's `scale`); the browser enlarges them further with
// nearest-neighbour too (CSS image-rendering: pixelated).
const PNG_SIDE = 64;
// The API key is kept for this browser tab only.
const KEY_STORAGE = "vae-playground-api-key";

const $ = (selector) => document.querySelector(selector);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) ?? "",
  model: null,
  scale: 1, // the API's `scale` for PNGs, from the model's input size
  samples: [], // latents of the sample grid
  file: null, // the last upload, read again when `invert` changes
  uploadMu: null, // its posterior mean
  dims: [], // the latent dimensions that have sliders, most used first
  base: null, // the explorer's latent before the sliders moved
  z: null, // the explorer's latent now
  ends: { A: null, B: null }, // interpolation endpoints: latents
};

class ApiError extends Error {
  constructor(message, status, detail) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

/** The `detail` of an error response in words: a string, or FastAPI's list of {loc, msg}. */
function describe(detail, status) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((entry) => `${(entry.loc ?? []).join(".")}: ${entry.msg}`).join("; ");
  }
  return `HTTP ${status}`;
}

/** One API call; the parsed JSON, or an ApiError that says which call failed and why. */
async function api(method, path, { query = {}, json, files } = {}) {
  // Relative to the page, so that the page also works behind a proxy that serves it under a prefix.
  const url = new URL(`.${path}`, document.baseURI);
  for (const [name, value] of Object.entries(query)) url.searchParams.set(name, String(value));
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (files) {
    body = new FormData();
    for (const file of files) body.append("files", file, file.name);
  }
  let response;
  try {
    response = await fetch(url, { method, headers, body });
  } catch (error) {
    throw new ApiError(`${method} ${path}: the service cannot be reached (${error.message})`, 0, null);
  }
  const text = await response.text();
  let content = null;
  try {
    content = JSON.parse(text);
  } catch {
    // not JSON: an error from something in front of the service; the status says enough
  }
  if (!response.ok) {
    let message = `${method} ${path} answered ${response.status}: ${describe(content?.detail, response.status)}`;
    if (response.status === 401 || response.status === 403) message += " (enter a valid API key at the top)";
    throw new ApiError(message, response.status, content?.detail);
  }
  return content;
}

/** An API call that returns PNGs, enlarged by `state.scale`; once a server refuses that scale, 1 is used. */
async function apiImages(method, path, options = {}) {
  try {
    return await api(method, path, { ...options, query: { ...options.query, scale: state.scale } });
  } catch (error) {
    const scaleRefused =
      error.status === 422 &&
      Array.isArray(error.detail) &&
      error.detail.some((entry) => entry.loc?.join(".") === "query.scale");
    if (!scaleRefused || state.scale === 1) throw error;
    state.scale = 1;
    return apiImages(method, path, options);
  }
}

/**
 * Runs `task` for a panel: marks it busy, shows the error it throws in the panel's alert. A later run of
 * the same panel supersedes an earlier one: `isCurrent()` tells the task whether it may still draw.
 */
async function run(panel, task) {
  const ticket = (panel.ticket = (panel.ticket ?? 0) + 1);
  const isCurrent = () => panel.ticket === ticket;
  const alert = panel.querySelector(":scope > .error");
  alert.hidden = true;
  panel.setAttribute("aria-busy", "true");
  try {
    await task(isCurrent);
  } catch (error) {
    if (isCurrent()) {
      alert.textContent = error.message;
      alert.hidden = false;
    }
  } finally {
    if (isCurrent()) panel.removeAttribute("aria-busy");
  }
}

const pngSource = (base64) => `data:image/png;base64,${base64}`;

function image(base64, alt) {
  const element = document.createElement("img");
  element.src = pngSource(base64);
  element.alt = alt;
  return element;
}

function element(tag, properties = {}, children = []) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

/** A number with `digits` decimals; no "-0.00" for values that round to zero. */
function format(value, digits = 3) {
  const text = value.toFixed(digits);
  return Number(text) === 0 ? (0).toFixed(digits) : text;
}

// ---- model card ----------------------------------------------------------------------------------------

function renderModel(model) {
  const [channels, height, width] = model.input_shape;
  // The forms ask for no more than this server gives.
  $("#n").max = String(model.limits.max_latents);
  $("#steps").max = String(model.limits.max_steps);
  const metrics = model.metrics;
  const split = model.dataset.split;
  $("#model-summary").textContent =
    `${model.name}: ${model.architecture} VAE on ${model.dataset.name}, ${channels}×${height}×${width} → ` +
    `${model.latent_dim} latent dimensions, running on ${model.provider}`;
  const rows = [
    ["Name", model.name],
    ["Architecture", `${model.architecture}, ${model.likelihood} likelihood`],
    ["Dataset", `${model.dataset.name} (${model.dataset.source})`],
    ["Split", `${split.train} train, ${split.val} validation, ${split.test} test images`],
    ["Input", `${channels}×${height}×${width}, ${model.input.foreground} strokes`],
    ["Latent size", String(model.latent_dim)],
    ["Test −ELBO", `${format(metrics.neg_elbo, 2)} nats (reconstruction ${format(metrics.reconstruction, 2)}` +
      ` + KL ${format(metrics.kl, 2)})`],
    ["Test NLL", `${format(metrics.iwae_nll, 2)} nats (IWAE, ${metrics.iwae_samples} samples)`],
    ["Active units", `${metrics.active_units} of ${model.latent_dim}`],
    ["Provider", model.provider],
    ["Exported", model.created_at.replace("T", " ").replace("Z", " UTC")],
  ];
  // invert=true reads the polarity the model was not trained on: dark strokes for a "light" model.
  $("#invert-label").textContent =
    model.input.foreground === "light" ? "dark strokes on a light background" : "light strokes on a dark background";
  $("#model-card").replaceChildren(
    ...rows.flatMap(([term, value]) => [element("dt", { textContent: term }), element("dd", { textContent: value })]),
  );
}

// ---- samples -------------------------------------------------------------------------------------------

async function drawSamples() {
  const query = { n: $("#n").value, temperature: $("#temperature").value };
  const seed = $("#seed").value.trim();
  if (seed !== "") query.seed = seed;
  await run($("#samples-panel"), async (isCurrent) => {
    const result = await apiImages("GET", "/sample", { query });
    if (!isCurrent()) return;
    state.samples = result.latents;
    const grid = $("#samples");
    grid.style.gridTemplateColumns = `repeat(${Math.ceil(Math.sqrt(result.images.length))}, 1fr)`;
    grid.replaceChildren(
      ...result.images.map((base64, i) => {
        const tile = element("button", { type: "button", title: `sample ${i + 1}: explore its latent` }, [
          image(base64, `sample ${i + 1}`),
        ]);
        tile.setAttribute("aria-pressed", "false");
        tile.addEventListener("click", () => {
          for (const other of grid.children) other.setAttribute("aria-pressed", String(other === tile));
          explore(state.samples[i], `sample ${i + 1} (seed ${seed || "random"})`);
        });
        return tile;
      }),
    );
    if (state.base === null) explore(result.latents[0], `sample 1 (seed ${seed || "random"})`);
    if (state.ends.A === null && result.latents.length >= 2) {
      setEnd("A", result.latents[0], pngSource(result.images[0]));
      setEnd("B", result.latents[1], pngSource(result.images[1]));
    }
  });
}

// ---- upload --------------------------------------------------------------------------------------------

async function analyse(file) {
  state.file = file;
  const query = { invert: $("#invert").checked };
  await run($("#upload-panel"), async (isCurrent) => {
    $("#upload-result").hidden = true;
    const reconstructed = await apiImages("POST", "/reconstruct", { query: { ...query, inputs: true }, files: [file] });
    const [posterior, divergence] = await Promise.all([
      api("POST", "/encode", { query, files: [file] }),
      api("POST", "/kl", { query, files: [file] }),
    ]);
    if (!isCurrent()) return;
    $("#input-image").src = pngSource(reconstructed.inputs[0]);
    $("#recon-image").src = pngSource(reconstructed.images[0]);
    $("#recon-loss").textContent = format(reconstructed.reconstruction[0]);
    $("#kl-total").textContent = format(divergence.kl[0]);
    state.uploadMu = posterior.mu[0];
    renderPosterior(posterior.mu[0], posterior.logvar[0], divergence.kl_per_dim[0]);
    $("#upload-result").hidden = false;
    explore(state.uploadMu, `the upload ${file.name}`);
  });
}

function bar(kind, left, width, title) {
  const fill = element("i");
  fill.style.left = `${left}%`;
  fill.style.width = `${width}%`;
  return element("div", { className: `bar ${kind}`, title }, [fill]);
}

const clamp = (value, low, high) => Math.min(high, Math.max(low, value));

/** Bars per latent dimension: mu around 0 (±SLIDER_RANGE), sigma on [0, 1] (the prior's), KL on its largest. */
function renderPosterior(mu, logvar, klPerDim) {
  const largestKL = Math.max(...klPerDim, 1e-9);
  const rows = mu.map((m, d) => {
    const sigma = Math.exp(logvar[d] / 2);
    const reach = (clamp(Math.abs(m), 0, SLIDER_RANGE) / SLIDER_RANGE) * 50;
    const cells = [
      [bar("mu", m < 0 ? 50 - reach : 50, reach, `μ = ${m}`), format(m, 2)],
      [bar("sigma", 0, clamp(sigma, 0, 1) * 100, `σ = ${sigma}`), format(sigma, 2)],
      [bar("kl", 0, (klPerDim[d] / largestKL) * 100, `KL = ${klPerDim[d]} nats`), format(klPerDim[d], 2)],
    ].map(([graphic, text]) =>
      element("td", {}, [element("div", { className: "value" }, [graphic, element("span", { textContent: text })])]),
    );
    const row = element("tr", {}, [element("td", { textContent: `z${d}` }), ...cells]);
    row.dataset.dim = String(d);
    return row;
  });
  $("#posterior tbody").replaceChildren(...rows);
  markSliderDims();
}

function markSliderDims() {
  for (const row of document.querySelectorAll("#posterior tbody tr")) {
    row.classList.toggle("slider-dim", state.dims.includes(Number(row.dataset.dim)));
  }
}

// ---- latent explorer -----------------------------------------------------------------------------------

/** The dimensions whose mu varies most over decoded prior samples: the ones the decoder listens to. */
async function findSliderDims() {
  // Within this server's limits: VAE_MAX_LATENTS is at least 16 (the default n); VAE_MAX_IMAGES may be 1,
  // so the samples are encoded in as many requests as it takes.
  const { max_images: maxImages, max_latents: maxLatents } = state.model.limits;
  const count = Math.min(PROBE_COUNT, maxLatents);
  await run($("#explorer-panel"), async () => {
    const probe = await api("GET", "/sample", { query: { n: count, seed: PROBE_SEED, scale: 1 } });
    const mu = [];
    for (let start = 0; start < count; start += maxImages) {
      const images = probe.images.slice(start, start + maxImages);
      mu.push(...(await api("POST", "/encode", { json: { images } })).mu);
    }
    const dims = mu[0].length;
    const variance = Array.from({ length: dims }, (_, d) => {
      const values = mu.map((row) => row[d]);
      const mean = values.reduce((sum, v) => sum + v, 0) / values.length;
      return values.reduce((sum, v) => sum + (v - mean) ** 2, 0) / values.length;
    });
    const ranked = variance.map((v, d) => [v, d]).sort((a, b) => b[0] - a[0]);
    const active = ranked.filter(([v]) => v > ACTIVE_VARIANCE).length;
    const sliders = clamp(active, Math.min(MIN_SLIDERS, dims), Math.min(MAX_SLIDERS, dims));
    state.dims = ranked.slice(0, sliders).map(([, d]) => d);
    $("#sliders-note").textContent =
      `Sliders on the ${sliders} of ${dims} latent dimensions whose μ varies most over ${count} decoded ` +
      `prior samples (${active} vary by more than ${ACTIVE_VARIANCE}); the others keep their value.`;
    renderSliders();
    markSliderDims();
  });
}

function renderSliders() {
  if (state.z === null) return;
  const rows = state.dims.map((d) => {
    const output = element("output", { textContent: format(state.z[d], 2) });
    const slider = element("input", {
      type: "range",
      min: -SLIDER_RANGE,
      max: SLIDER_RANGE,
      step: 0.01,
      value: clamp(state.z[d], -SLIDER_RANGE, SLIDER_RANGE),
      id: `slider-${d}`,
    });
    slider.setAttribute("aria-label", `latent dimension ${d}`);
    slider.addEventListener("input", () => {
      if (state.z === null) return; // the model is being (re)loaded: the sliders are going away
      state.z[d] = Number(slider.value);
      output.textContent = format(state.z[d], 2);
      decodeExplorer();
    });
    return element("div", { className: "slider" }, [
      element("label", { textContent: `z${d}`, htmlFor: slider.id }),
      slider,
      output,
    ]);
  });
  $("#sliders").replaceChildren(...rows);
}

function explore(latent, source) {
  state.base = [...latent];
  state.z = [...latent];
  $("#explorer-source").textContent = source;
  renderSliders();
  decodeExplorer();
}

// One /decode at a time: slider moves during a request are folded into the next one.
let decoding = false;
let decodeAgain = false;

async function decodeExplorer() {
  if (decoding) {
    decodeAgain = true;
    return;
  }
  decoding = true;
  try {
    do {
      decodeAgain = false;
      const z = [...state.z];
      await run($("#explorer-panel"), async (isCurrent) => {
        const result = await apiImages("POST", "/decode", { json: { latents: [z] } });
        if (isCurrent()) $("#explorer-image").src = pngSource(result.images[0]);
      });
    } while (decodeAgain);
  } finally {
    decoding = false;
  }
}

// ---- interpolation -------------------------------------------------------------------------------------

/** Sets endpoint A or B to a latent, shown by `imageSource` (a data: URL of its image). */
function setEnd(which, latent, imageSource) {
  state.ends[which] = [...latent];
  $(`#end-${which.toLowerCase()}`).src = imageSource;
  interpolate();
}

async function interpolate() {
  const { A, B } = state.ends;
  if (A === null || B === null) return;
  const query = { steps: $("#steps").value, method: $("#method").value };
  await run($("#interpolation-panel"), async (isCurrent) => {
    const result = await apiImages("POST", "/interpolate", { query, json: { latents: [A, B] } });
    if (!isCurrent()) return;
    $("#strip").replaceChildren(...result.images.map((base64, i) => image(base64, `step ${i + 1}`)));
  });
}

// ---- start ---------------------------------------------------------------------------------------------

/** Clears what the previous model (or key) showed: nothing stays on screen that no longer answers. */
function clearResults() {
  for (const id of ["#samples", "#sliders", "#strip", "#model-card", "#posterior tbody"]) {
    $(id).replaceChildren();
  }
  for (const id of ["#explorer-image", "#end-a", "#end-b", "#input-image", "#recon-image"]) {
    $(id).removeAttribute("src");
  }
  $("#upload-result").hidden = true;
  $("#explorer-source").textContent = "";
  $("#sliders-note").textContent = "";
  state.file = null;
  state.uploadMu = null;
}

async function start() {
  state.model = null;
  state.base = null;
  state.z = null;
  state.ends = { A: null, B: null };
  clearResults();
  await run($("#top"), async () => {
    state.model = await api("GET", "/model");
  });
  if (state.model === null) {
    $("#model-summary").textContent = "The model could not be loaded.";
    return;
  }
  renderModel(state.model);
  const [, height, width] = state.model.input_shape;
  state.scale = Math.max(1, Math.floor(PNG_SIDE / Math.max(height, width)));
  await Promise.all([drawSamples(), findSliderDims()]);
}

function wire() {
  const key = $("#api-key");
  key.value = state.key;
  $("#key-form").addEventListener("submit", (event) => event.preventDefault());
  key.addEventListener("change", () => {
    state.key = key.value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    else sessionStorage.removeItem(KEY_STORAGE);
    start();
  });

  $("#sample-form").addEventListener("submit", (event) => {
    event.preventDefault();
    drawSamples();
  });
  for (const id of ["#n", "#seed", "#temperature"]) $(id).addEventListener("change", drawSamples);
  $("#new-samples").addEventListener("click", () => {
    $("#seed").value = String(Math.floor(Math.random() * 2 ** 31));
    drawSamples();
  });

  const drop = $("#drop");
  const file = $("#file");
  file.addEventListener("change", () => {
    if (file.files.length > 0) analyse(file.files[0]);
    file.value = ""; // choosing the same file again reads it again
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  // A file dropped anywhere else on the page is read too, rather than opened by the browser in its place.
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length > 0) analyse(event.dataTransfer.files[0]);
  });
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    event.stopPropagation(); // read once: not again by the page's own handler
    drop.classList.remove("over");
    if (event.dataTransfer.files.length > 0) analyse(event.dataTransfer.files[0]);
  });
  $("#invert").addEventListener("change", () => {
    if (state.file !== null) analyse(state.file);
  });
  $("#upload-explore").addEventListener("click", () => {
    if (state.uploadMu !== null) explore(state.uploadMu, `the upload ${state.file.name}`);
  });

  $("#reset-sliders").addEventListener("click", () => {
    if (state.base !== null) explore(state.base, $("#explorer-source").textContent);
  });
  $("#use-as-a").addEventListener("click", () => {
    if (state.z !== null) setEnd("A", state.z, $("#explorer-image").src);
  });
  $("#use-as-b").addEventListener("click", () => {
    if (state.z !== null) setEnd("B", state.z, $("#explorer-image").src);
  });
  $("#interpolation-form").addEventListener("submit", (event) => {
    event.preventDefault();
    interpolate();
  });
  for (const id of ["#steps", "#method"]) $(id).addEventListener("change", interpolate);
}

wire();
start();
