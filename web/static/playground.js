// The playground: submits over REST, follows premium runs over the live
// WebSocket (reconnecting and re-subscribing when it drops; the server
// replays what was missed), one card per run.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("generate-form");
  const runsList = document.getElementById("runs");
  const template = document.getElementById("run-template");
  const randomSeed = document.getElementById("random-seed");
  const premium = document.body.dataset.tier === "premium";
  const runs = new Map();
  let models = {};
  // img2img / inpainting inputs: a data: URL of a chosen file, or a
  // reference to one of the user's own results.
  const inputs = { init_image: null, mask: null };
  const initNote = document.getElementById("init-note");
  const clearInputs = document.getElementById("clear-inputs");
  let socket = null;
  let retryMs = 1000;

  // --- the form ------------------------------------------------------------

  randomSeed.addEventListener("change", () => {
    form.seed.disabled = randomSeed.checked;
    if (!randomSeed.checked && form.seed.value === "") {
      form.seed.value = String(Math.floor(Math.random() * 4294967295));
    }
  });

  function applyModel(keepValues) {
    const model = models[form.model.value];
    if (!model) return;
    form.scheduler.replaceChildren(
      ...model.schedulers.map((name) => sdapi.el("option", { value: name }, name))
    );
    form.scheduler.value = model.default_scheduler;
    for (const [name, max] of [["width", model.max_width], ["height", model.max_height]]) {
      form[name].max = String(max);
      if (!keepValues) form[name].value = String(Math.min(512, max));
    }
    if (!keepValues) {
      form.steps.value = String(model.default_steps);
      form.guidance_scale.value = String(model.default_guidance);
    }
    const note = document.getElementById("model-note");
    note.textContent = model.available
      ? model.nodes + (model.nodes === 1 ? " GPU node" : " GPU nodes") + " ready; up to "
        + model.max_width + "×" + model.max_height + "."
      : "No GPU node is up right now: requests wait in the queue until one starts.";
  }

  async function loadModels() {
    const result = await sdapi.api("GET", "/api/v1/models");
    if (!result.ok) {
      sdapi.showErrors(form, result);
      return;
    }
    models = {};
    form.model.replaceChildren();
    for (const model of result.data.items) {
      models[model.id] = model;
      const label = model.available ? model.id : model.id + " (waiting for a GPU)";
      form.model.append(sdapi.el("option", { value: model.id }, label));
    }
    applyModel(false);
  }

  form.model.addEventListener("change", () => applyModel(false));

  function readFile(input, key) {
    input.addEventListener("change", () => {
      const file = input.files && input.files[0];
      if (!file) {
        inputs[key] = null;
        return;
      }
      const reader = new FileReader();
      reader.addEventListener("load", () => {
        inputs[key] = reader.result;
        if (key === "init_image") {
          initNote.textContent = "Starting from " + file.name + ".";
        }
        clearInputs.hidden = false;
      });
      reader.readAsDataURL(file);
    });
  }
  readFile(form.init_image, "init_image");
  readFile(form.mask, "mask");

  function useAsStart(run, index) {
    inputs.init_image = { generation_id: run.id, index };
    form.init_image.value = "";
    initNote.textContent = "Starting from image " + (index + 1) + " of “" + run.request.prompt + "”.";
    clearInputs.hidden = false;
    form.prompt.focus();
  }

  clearInputs.addEventListener("click", () => {
    inputs.init_image = null;
    inputs.mask = null;
    form.init_image.value = "";
    form.mask.value = "";
    initNote.textContent = "";
    clearInputs.hidden = true;
  });

  document.getElementById("tier-note").textContent = premium
    ? "Premium: images arrive here in seconds."
    : "Normal account: requests run in the next batch window and are emailed.";

  function requestBody() {
    const body = {
      prompt: form.prompt.value,
      model: form.model.value,
      scheduler: form.scheduler.value,
    };
    if (form.negative_prompt.value) body.negative_prompt = form.negative_prompt.value;
    for (const name of ["width", "height", "steps", "num_images"]) {
      if (form[name].value !== "") body[name] = Number.parseInt(form[name].value, 10);
    }
    if (form.guidance_scale.value !== "") {
      body.guidance_scale = Number.parseFloat(form.guidance_scale.value);
    }
    if (!randomSeed.checked && form.seed.value !== "") {
      body.seed = Number.parseInt(form.seed.value, 10);
    }
    if (inputs.init_image) body.init_image = inputs.init_image;
    if (inputs.mask) body.mask = inputs.mask;
    if ((inputs.init_image || inputs.mask) && form.strength.value !== "") {
      body.strength = Number.parseFloat(form.strength.value);
    }
    return body;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sdapi.clearErrors(form);
    const button = document.getElementById("generate");
    button.disabled = true;
    const result = await sdapi.api("POST", "/api/v1/generations", requestBody());
    button.disabled = false;
    if (!result.ok) {
      sdapi.showErrors(form, result);
      return;
    }
    addRun(result.data);
  });

  function reuse(request) {
    form.prompt.value = request.prompt;
    form.negative_prompt.value = request.negative_prompt || "";
    if (models[request.model]) form.model.value = request.model;
    applyModel(true);
    for (const name of ["width", "height", "steps", "guidance_scale", "num_images", "scheduler"]) {
      form[name].value = String(request[name]);
    }
    randomSeed.checked = false;
    form.seed.disabled = false;
    form.seed.value = String(request.seed);
    form.prompt.focus();
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  // --- runs ----------------------------------------------------------------

  function part(run, selector) {
    return run.card.querySelector(selector);
  }

  function setStatus(run, status) {
    run.status = status;
    const badge = part(run, ".status");
    badge.textContent = status;
    badge.className = "status " + status;
    const finished = ["succeeded", "failed", "cancelled"].includes(status);
    part(run, ".cancel").hidden = finished;
    part(run, ".reuse").hidden = !finished;
    if (finished) part(run, ".run-progress").hidden = true;
  }

  function addRun(generation) {
    document.getElementById("no-runs").hidden = true;
    const card = template.content.firstElementChild.cloneNode(true);
    const run = {
      id: generation.id,
      card,
      request: generation.request,
      submitted: performance.now(),
      images: new Map(),
      status: generation.status,
    };
    card.dataset.id = generation.id;
    part(run, ".run-prompt").textContent = generation.request.prompt;
    part(run, ".cancel").addEventListener("click", () => cancel(run));
    part(run, ".reuse").addEventListener("click", () => reuse(run.request));
    runsList.prepend(card);
    runs.set(run.id, run);
    setStatus(run, generation.status);
    if (generation.status === "scheduled") {
      part(run, ".run-note").textContent = "Scheduled for " + sdapi.when(generation.scheduled_for)
        + ". It runs then in a batch, and the images will be emailed to you. "
        + "You can follow or cancel it in History.";
      return;
    }
    noteQueued(run, generation.queue_position, generation.waiting_for_node);
    follow(run);
  }

  function noteQueued(run, position, waiting) {
    if (run.status !== "queued") return;
    const place = position === null || position === undefined ? "" : " (position " + (position + 1) + ")";
    part(run, ".run-note").textContent = waiting
      ? "Waiting for a GPU node to start" + place + "…"
      : "In the queue" + place + "…";
  }

  async function cancel(run) {
    part(run, ".cancel").disabled = true;
    const result = await sdapi.api("DELETE", "/api/v1/generations/" + run.id);
    part(run, ".cancel").disabled = false;
    if (!result.ok) {
      part(run, ".run-note").textContent = result.data && result.data.error
        ? result.data.error.message : "Could not cancel it.";
      return;
    }
    if (run.status === "scheduled") {
      setStatus(run, "cancelled");
      part(run, ".run-note").textContent = "Cancelled.";
    }
  }

  function showImage(run, frame) {
    let figure = run.images.get(frame.index);
    if (!figure) {
      figure = sdapi.el("figure");
      const image = sdapi.el("img", {
        alt: "Image " + (frame.index + 1) + " for: " + run.request.prompt,
        width: String(run.request.width),
        height: String(run.request.height),
      });
      const caption = sdapi.el("figcaption");
      figure.append(image, caption);
      run.images.set(frame.index, figure);
      const holder = part(run, ".images");
      const after = [...run.images.keys()].filter((i) => i > frame.index).sort((a, b) => a - b)[0];
      holder.insertBefore(figure, after === undefined ? null : run.images.get(after));
    }
    const image = figure.querySelector("img");
    image.src = frame.data ? "data:image/png;base64," + frame.data : frame.url;
    const caption = figure.querySelector("figcaption");
    const link = sdapi.el("a", { href: frame.url, download: "sdapi-" + run.id + "-" + frame.index + ".png" }, "Download");
    const start = sdapi.el("button", { type: "button", class: "link" }, "Use as starting image");
    start.addEventListener("click", () => useAsStart(run, frame.index));
    caption.replaceChildren(link, document.createTextNode(" · seed " + frame.seed + " · "), start);
    part(run, ".preview").hidden = true;
  }

  function finish(run, frame) {
    setStatus(run, frame.status);
    const seconds = ((performance.now() - run.submitted) / 1000).toFixed(1);
    const request = run.request;
    if (frame.status === "succeeded") {
      part(run, ".run-note").textContent = "";
      part(run, ".run-meta").textContent = "Seed " + request.seed + " · " + request.steps + " steps · "
        + request.width + "×" + request.height + " · " + request.scheduler + " · took " + seconds + " s";
    } else if (frame.status === "failed") {
      part(run, ".run-note").textContent = "Failed: " + (frame.error ? frame.error.message : "unknown reason");
    } else {
      part(run, ".run-note").textContent = "Cancelled.";
    }
    part(run, ".preview").hidden = true;
  }

  function onFrame(frame) {
    const run = runs.get(frame.id);
    if (!run) return;
    switch (frame.type) {
      case "queued":
        noteQueued(run, frame.position, frame.waiting_for_node);
        break;
      case "started":
        if (run.status === "queued") setStatus(run, "running");
        part(run, ".run-note").textContent = "";
        part(run, ".run-progress").hidden = false;
        break;
      case "progress": {
        if (run.status === "queued") setStatus(run, "running");
        part(run, ".run-note").textContent = "";
        const bar = part(run, "progress");
        bar.max = frame.total;
        bar.value = frame.step;
        part(run, ".run-progress").hidden = false;
        part(run, ".steps").textContent = "Step " + frame.step + " of " + frame.total;
        if (frame.preview) {
          const preview = part(run, ".preview");
          preview.src = frame.preview;
          preview.hidden = false;
        }
        break;
      }
      case "image":
        showImage(run, frame);
        break;
      case "done":
        finish(run, frame);
        break;
      case "error":
        part(run, ".run-note").textContent = frame.message;
        break;
      default:
        break;
    }
  }

  // --- the live socket -----------------------------------------------------

  function unfinished() {
    return [...runs.values()].filter((run) => ["queued", "running"].includes(run.status));
  }

  function follow(run) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "subscribe", id: run.id }));
    } else {
      connect();
    }
  }

  function connect() {
    if (socket && (socket.readyState === WebSocket.OPEN || socket.readyState === WebSocket.CONNECTING)) {
      return;
    }
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(scheme + "//" + window.location.host + "/api/v1/ws");
    socket.addEventListener("open", () => {
      retryMs = 1000;
      for (const run of unfinished()) {
        socket.send(JSON.stringify({ type: "subscribe", id: run.id }));
      }
    });
    socket.addEventListener("message", (event) => {
      try { onFrame(JSON.parse(event.data)); } catch (err) { /* not ours */ }
    });
    socket.addEventListener("close", () => {
      socket = null;
      if (!unfinished().length) return;
      for (const run of unfinished()) {
        part(run, ".run-note").textContent = "Connection lost; reconnecting…";
      }
      window.setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    });
  }

  loadModels();
});
