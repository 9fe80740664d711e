// speechclip's page: record, upload, drop or type a query; show pictures, keywords and spoken captions.
// Text from the server or the user only ever goes into textContent or attributes, never into HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TARGET_RATE = 16000;
const state = { info: null, recorder: null, ticket: 0, recording: null };  // recording: the last WAV sent

function el(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function show(id, visible) { $(id).hidden = !visible; }

function setStatus(message) { $("status").textContent = message; }

function showError(message) {
  $("error").textContent = message;
  show("error", true);
  setStatus("");
}

async function errorText(response) {
  // The API answers {"detail": "one sentence"}; anything else is described by its status.
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (body.detail !== undefined) return JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

// ---- searching -------------------------------------------------------------------------------------

async function search(fields, queryNodes) {
  const ticket = ++state.ticket;  // a slower earlier answer never replaces a newer one
  const data = new FormData();
  for (const [name, value, filename] of fields) {
    if (filename) data.append(name, value, filename); else data.append(name, value);
  }
  data.append("k", $("k").value);
  show("error", false);
  setStatus("Searching…");
  $("query").replaceChildren(...queryNodes);
  show("query", true);
  let response;
  try {
    response = await fetch("search", { method: "POST", body: data });
  } catch (error) {
    if (ticket === state.ticket) showError(`The server could not be reached (${error.message}).`);
    return;
  }
  if (ticket !== state.ticket) return;
  if (!response.ok) {
    const message = await errorText(response);
    if (ticket === state.ticket) { clearResults(); showError(message); }
    return;
  }
  const found = await response.json();
  if (ticket === state.ticket) render(found);
}

function searchText(text) {
  const query = text.trim();
  if (!query) { showError("Type something to search for."); return; }
  history.replaceState(null, "", `?q=${encodeURIComponent(query)}`);  // the address is a link to this search
  search([["text", query]], [el("span", { class: "label", text: "Text: " }), el("q", { text: query })]);
}

function searchImageId(id, thumbnail) {
  history.replaceState(null, "", location.pathname);
  search([["image_id", id]], [el("span", { class: "label", text: "Picture: " }),
    el("img", { src: thumbnail, alt: id, class: "query-image" }), el("span", { text: id })]);
}

function searchFile(file) {
  const limit = state.info ? state.info.limits.max_upload_mb : 20;
  if (file.size > limit * 1024 * 1024) {
    showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB, over the ${limit} MB upload limit.`);
    return;
  }
  const isImage = file.type.startsWith("image/");
  const url = URL.createObjectURL(file);
  const preview = isImage ? el("img", { src: url, alt: file.name, class: "query-image" })
                          : el("audio", { src: url, controls: "" });
  history.replaceState(null, "", location.pathname);
  search([[isImage ? "image" : "audio", file, file.name]],
         [el("span", { class: "label", text: isImage ? "Picture: " : "Audio: " }), el("span", { text: file.name }), preview]);
}

// ---- showing results -------------------------------------------------------------------------------

function clearResults() {
  for (const id of ["keywords", "results", "clips"]) $(id).replaceChildren();
  for (const id of ["keywords-panel", "results-panel", "clips-panel"]) show(id, false);
}

function render(found) {
  clearResults();
  renderKeywords(found.keywords);
  renderResults(found.results || []);
  renderClips(found.clips);
  const clips = found.clips ? `, ${found.clips.length} spoken captions` : "";
  setStatus(`${(found.results || []).length} pictures${clips}.`);
}

function renderKeywords(slots) {
  // One entry per keyword slot; the number of slots may differ between utterances.
  if (!slots || !slots.length) return;
  $("keywords").replaceChildren(...slots.map((choices) => {
    const [best, ...others] = choices;
    const alternatives = others.map((c) => `${c.subword} ${c.score.toFixed(2)}`).join(", ");
    return el("li", { class: "slot" }, [
      el("span", { class: "subword", text: best.subword }),
      el("span", { class: "score", text: best.score.toFixed(2) }),
      el("span", { class: "alternatives", text: alternatives }),
    ]);
  }));
  show("keywords-panel", true);
}

function renderResults(results) {
  $("results").replaceChildren(...results.map((hit) => {
    const image = el("img", { src: hit.thumbnail, alt: hit.id, loading: "lazy" });
    image.addEventListener("load", () => {
      if (image.naturalWidth < 128) image.classList.add("pixelated");  // small renders stay crisp when enlarged
    });
    const button = el("button", { type: "button", class: "result", title: `Search with ${hit.id}` }, [
      image, el("span", { class: "score", text: hit.score.toFixed(3) }), el("span", { class: "id", text: hit.id }),
    ]);
    button.addEventListener("click", () => searchImageId(hit.id, hit.thumbnail));
    return el("li", {}, [button]);
  }));
  show("results-panel", results.length > 0);
}

function renderClips(clips) {
  if (!clips) return;
  $("clips").replaceChildren(...clips.map((hit) => el("li", { class: "clip" }, [
    el("audio", { src: hit.audio_url, controls: "", preload: "none" }),
    el("span", { class: "score", text: hit.score.toFixed(3) }),
    el("span", { class: "text", text: hit.text || hit.id }),
  ])));
  show("clips-panel", clips.length > 0);
}

// ---- recording: microphone -> 16 kHz mono 16-bit WAV, made here so every browser sends the same format ----

async function startRecording() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This browser cannot record here (a microphone needs https or localhost).");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false,
      noiseSuppression: false, autoGainControl: false } });
  } catch (error) {
    showError(`No microphone: ${error.message}`);
    return;
  }
  const context = new AudioContext();
  if (context.state === "suspended") await context.resume();
  const source = context.createMediaStreamSource(stream);
  const processor = context.createScriptProcessor(4096, 1, 1);  // everywhere, unlike a worklet module
  const chunks = [];
  processor.onaudioprocess = (event) => chunks.push(new Float32Array(event.inputBuffer.getChannelData(0)));
  source.connect(processor);
  processor.connect(context.destination);  // a script processor only runs when connected
  const started = performance.now();
  const maxSeconds = state.info ? state.info.limits.max_audio_seconds : 60;
  const timer = setInterval(() => {
    const seconds = (performance.now() - started) / 1000;
    setStatus(`Recording… ${seconds.toFixed(1)} s (click Stop when done)`);
    if (seconds >= maxSeconds - 0.5) stopRecording();
  }, 100);
  state.recorder = { stream, context, source, processor, chunks, timer };
  show("error", false);
  $("record").textContent = "Stop";
  $("record").setAttribute("aria-pressed", "true");
  $("record").classList.add("recording");
}

async function stopRecording() {
  const recorder = state.recorder;
  if (!recorder) return;
  state.recorder = null;
  clearInterval(recorder.timer);
  $("record").textContent = "Record";
  $("record").setAttribute("aria-pressed", "false");
  $("record").classList.remove("recording");
  recorder.processor.disconnect();
  recorder.source.disconnect();
  recorder.stream.getTracks().forEach((track) => track.stop());
  const rate = recorder.context.sampleRate;
  await recorder.context.close();
  const samples = concatenate(recorder.chunks);
  if (!samples.length) { showError("Nothing was recorded."); return; }
  const wav = encodeWav(await resample(samples, rate, TARGET_RATE), TARGET_RATE);
  state.recording = wav;
  const seconds = samples.length / rate;
  history.replaceState(null, "", location.pathname);
  search([["audio", wav, "recording.wav"]], [el("span", { class: "label", text: "Your recording: " }),
    el("span", { text: `${seconds.toFixed(1)} s` }), el("audio", { src: URL.createObjectURL(wav), controls: "" })]);
}

function concatenate(chunks) {
  const out = new Float32Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) { out.set(chunk, offset); offset += chunk.length; }
  return out;
}

async function resample(samples, from, to) {
  // The browser's own resampler (an offline render at the target rate), not a hand-made filter.
  if (from === to) return samples;
  const offline = new OfflineAudioContext(1, Math.ceil(samples.length * to / from), to);
  const buffer = offline.createBuffer(1, samples.length, from);
  buffer.copyToChannel(samples, 0);
  const node = offline.createBufferSource();
  node.buffer = buffer;
  node.connect(offline.destination);
  node.start();
  return (await offline.startRendering()).getChannelData(0);
}

function encodeWav(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, value) => { for (let i = 0; i < value.length; i++) view.setUint8(offset + i, value.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, samples.length * 2, true);
  samples.forEach((sample, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, sample)) * 0x7fff, true));
  return new Blob([view], { type: "audio/wav" });
}

// ---- wiring ----------------------------------------------------------------------------------------

async function loadInfo() {
  try {
    const response = await fetch("info");
    if (!response.ok) return;
    state.info = await response.json();
    const clips = state.info.clips ? `, ${state.info.clips} spoken captions` : "";
    const keywords = state.info.keywords ? "; spoken queries also show the keywords the model heard" : "";
    $("about").textContent = `${state.info.images} pictures${clips}; ${state.info.variant} model${keywords}.`;
  } catch (_) { /* the page still works with the default bounds */ }
}

function wire() {
  $("search").addEventListener("submit", (event) => { event.preventDefault(); searchText($("text").value); });
  $("record").addEventListener("click", () => (state.recorder ? stopRecording() : startRecording()));
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) searchFile(file);
    $("file").value = "";
  });
  document.addEventListener("dragover", (event) => { event.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) searchFile(file);
  });
}

wire();
loadInfo().then(() => {
  const query = new URLSearchParams(location.search).get("q");
  if (query) { $("text").value = query; searchText(query); }
});
