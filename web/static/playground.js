// The playground: submits over REST, follows premium runs over the live
// WebSocket (reconnecting and re-subscribing when it drops; the server
// replays what was missed), one card per run. The model picker follows the
// models' state (polled while the page is visible); LoRAs of the chosen
// model go with the request.
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
  // Often enough to notice a GPU node coming or going, rare enough to cost
  // nothing: one small GET while the page is on screen.
  const MODELS_POLL_MS = 10000;
  const MAX_LORAS = 4;
  const STATE_LABELS = {
    ready: "ready",
    loadable: "loads on first use",
    waiting_for_node: "waiting for a GPU node",
  };
  const loraChoice = document.getElementById("lora-choice");
  const loraAdd = document.getElementById("lora-add");
  const loraList = document.getElementById("lora-list");
  const loraNote = document.getElementById("lora-note");
  const loraTemplate = document.getElementById("lora-template");
  // The chosen LoRAs, in order: { name, row } (the row holds the weight).
  const chosenLoras = [];

  // --- the form ------------------------------------------------------------

  // Fields the user has typed in before the models arrived: the first list
  // must not put the model's defaults (applyModel) over them. The form shows
  // before this script runs, so what it already holds was typed too.
  const MODEL_DEFAULTED = ["width", "height", "steps", "guidance_scale"];
  const typedBeforeModels = new Set(
    MODEL_DEFAULTED.filter((name) => form[name].value !== form[name].defaultValue)
  );
  // The first list of models: a run sent before it arrived waits for it.
  let firstModels = Promise.resolve();
  form.addEventListener("input", (event) => {
    if (!Object.keys(models).length && event.target.name) {
      typedBeforeModels.add(event.target.name);
    }
  });

  randomSeed.addEventListener("change", () => {
    form.seed.disabled = randomSeed.checked;
    if (!randomSeed.checked && form.seed.value === "") {
      form.seed.value = String(Math.floor(Math.random() * 4294967295));
    }
  });

  function stateOf(model) {
    if (model.state) return model.state;
    return model.available ? "ready" : "waiting_for_node";
  }

  function modelLabel(model) {
    return model.id + " — " + (STATE_LABELS[stateOf(model)] || stateOf(model));
  }

  function showModelNote(model) {
    const note = document.getElementById("model-note");
    const nodes = model.nodes + (model.nodes === 1 ? " GPU node" : " GPU nodes");
    const size = " Up to " + model.max_width + "×" + model.max_height + ".";
    switch (stateOf(model)) {
      case "ready":
        note.textContent = "Ready on " + nodes + "." + size;
        break;
      case "loadable":
        note.textContent = "On " + nodes + " but not loaded: the first image waits "
          + "while the model loads." + size;
        break;
      default:
        note.textContent = "No GPU node serves this model right now: requests wait in "
          + "the queue until one starts.";
    }
    note.dataset.state = stateOf(model);
  }

  function applyModel(keepValues) {
    const model = models[form.model.value];
    if (!model) return;
    form.scheduler.replaceChildren(
      ...model.schedulers.map((name) => sdapi.el("option", { value: name }, name))
    );
    form.scheduler.value = model.default_scheduler;
    const defaults = {
      width: Math.min(512, model.max_width),
      height: Math.min(512, model.max_height),
      steps: model.default_steps,
      guidance_scale: model.default_guidance,
    };
    form.width.max = String(model.max_width);
    form.height.max = String(model.max_height);
    for (const name of MODEL_DEFAULTED) {
      if (!keepValues && !typedBeforeModels.delete(name)) {
        form[name].value = String(defaults[name]);
      }
    }
    showModelNote(model);
    keepLorasOf(model);
    fillLoraChoice();
  }

  // Updates the picker in place (a refresh must not reset what the user set,
  // nor close a select that is open when the list is the same).
  async function loadModels(first) {
    const result = await sdapi.api("GET", "/api/v1/models");
    if (!result.ok) {
      if (first) sdapi.showErrors(form, result);
      return;
    }
    const previous = models;
    models = {};
    for (const model of result.data.items) models[model.id] = model;
    const ids = result.data.items.map((model) => model.id);
    const options = [...form.model.options];
    const same = options.length === ids.length
      && options.every((option, i) => option.value === ids[i]);
    if (same) {
      options.forEach((option, i) => {
        const label = modelLabel(models[ids[i]]);
        if (option.textContent !== label) option.textContent = label;
      });
    } else {
      const selected = form.model.value;
      form.model.replaceChildren(
        ...ids.map((id) => sdapi.el("option", { value: id }, modelLabel(models[id])))
      );
      if (models[selected]) {
        form.model.value = selected;
      } else {
        // At first a model that needs no wait: a ready one, else a loadable one.
        const best = ["ready", "loadable"]
          .map((state) => ids.find((id) => stateOf(models[id]) === state))
          .find((id) => id !== undefined);
        if (best !== undefined) form.model.value = best;
      }
    }
    const model = models[form.model.value];
    if (first || !previous[form.model.value]) {
      applyModel(false);
    } else if (model) {
      showModelNote(model);
      fillLoraChoice();
    }
    // While the socket is down, the runs say so instead.
    if (socket && socket.readyState === WebSocket.OPEN) {
      for (const run of unfinished()) noteQueued(run, run.position, undefined);
    }
  }

  function pollModels() {
    window.setInterval(() => {
      if (!document.hidden) loadModels(false);
    }, MODELS_POLL_MS);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) loadModels(false);
    });
  }

  // --- LoRAs -----------------------------------------------------------------

  function lorasOf(model) {
    if (!model || !model.loras) return [];
    // The API lists every LoRA of the model's nodes; only those made for
    // the model's base fit it (the server refuses the others).
    const base = model.lora_kind || "";
    return model.loras.filter((lora) => !base || lora.kind === base);
  }

  function loraInfo(name) {
    return lorasOf(models[form.model.value]).find((lora) => lora.name === name);
  }

  function fillLoraChoice() {
    const taken = new Set(chosenLoras.map((entry) => entry.name));
    const free = lorasOf(models[form.model.value]).filter((lora) => !taken.has(lora.name));
    const selected = loraChoice.value;
    const full = chosenLoras.length >= MAX_LORAS;
    const none = !lorasOf(models[form.model.value]).length;
    if (free.length && !full) {
      loraChoice.replaceChildren(
        ...free.map((lora) => sdapi.el("option", { value: lora.name }, lora.name))
      );
      if (free.some((lora) => lora.name === selected)) loraChoice.value = selected;
    } else {
      // A disabled select still says why there is nothing to pick.
      const why = none ? "none for this model" : full ? "at most " + MAX_LORAS : "all added";
      loraChoice.replaceChildren(sdapi.el("option", { value: "" }, "(" + why + ")"));
    }
    loraChoice.disabled = !free.length || full;
    loraAdd.disabled = !free.length || full;
    if (full) {
      loraNote.textContent = "At most " + MAX_LORAS + " LoRAs per image.";
    } else if (none) {
      loraNote.textContent = "No LoRA is available for this model.";
    } else {
      loraNote.textContent = "";
    }
  }

  function addLora(name, weight) {
    if (chosenLoras.some((entry) => entry.name === name)) return null;
    const row = loraTemplate.content.firstElementChild.cloneNode(true);
    const id = "lora-weight-" + chosenLoras.length + "-" + Date.now();
    row.querySelector(".lora-name").textContent = name;
    const input = row.querySelector("input");
    input.id = id;
    input.name = "lora-weight";
    input.value = String(weight);
    input.setAttribute("aria-label", "Weight of " + name + " (-4 to 4)");
    const info = loraInfo(name);
    const triggers = row.querySelector(".lora-triggers");
    if (info && info.trigger_words && info.trigger_words.length) {
      triggers.textContent = "Trigger words: " + info.trigger_words.join(", ");
    }
    const entry = { name, row, input };
    const remove = row.querySelector(".remove");
    remove.setAttribute("aria-label", "Remove " + name);
    remove.addEventListener("click", () => {
      chosenLoras.splice(chosenLoras.indexOf(entry), 1);
      row.remove();
      fillLoraChoice();
      loraChoice.focus();
    });
    chosenLoras.push(entry);
    loraList.append(row);
    fillLoraChoice();
    return entry;
  }

  function clearLoras() {
    chosenLoras.splice(0).forEach((entry) => entry.row.remove());
  }

  // A LoRA made for another model's base is dropped when the model changes.
  function keepLorasOf(model) {
    const names = new Set(lorasOf(model).map((lora) => lora.name));
    const dropped = chosenLoras.filter((entry) => !names.has(entry.name));
    for (const entry of dropped) {
      chosenLoras.splice(chosenLoras.indexOf(entry), 1);
      entry.row.remove();
    }
  }

  loraAdd.addEventListener("click", () => {
    if (!loraChoice.value) return;
    const entry = addLora(loraChoice.value, 1);
    if (entry) entry.input.focus();
  });

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
    if (chosenLoras.length) {
      body.loras = chosenLoras.map((entry) => ({
        name: entry.name,
        weight: entry.input.value === "" ? 1 : Number.parseFloat(entry.input.value),
      }));
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
    await firstModels;
    // The first list failed: asked again, and its error shown if it fails
    // again (a run without a model could only be refused).
    if (!Object.keys(models).length) await loadModels(true);
    if (!Object.keys(models).length) {
      button.disabled = false;
      return;
    }
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
    clearLoras();
    for (const lora of request.loras || []) addLora(lora.name, lora.weight);
    fillLoraChoice();
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
      const done = generation.eta_s === null ? "" : " (done in " + sdapi.about(generation.eta_s) + ")";
      part(run, ".run-note").textContent = "Scheduled for " + sdapi.when(generation.scheduled_for)
        + done + ". It runs then in a batch, and the images will be emailed to you. "
        + "You can follow or cancel it in History.";
      return;
    }
    noteQueued(run, generation.queue_position, generation.waiting_for_node, generation.eta_s);
    follow(run);
  }

  // `waiting` undefined: as the model's state says now (the picker's poll).
  // `eta` (seconds until done): when it was estimated; null: not known yet.
  function noteQueued(run, position, waiting, eta) {
    run.position = position;
    if (eta !== undefined) run.eta = eta === null ? null : { seconds: eta, at: performance.now() };
    if (run.status !== "queued") return;
    if (waiting === undefined) {
      const model = models[run.request.model];
      if (!model) return;
      waiting = stateOf(model) === "waiting_for_node";
    }
    const place = position === null || position === undefined ? "" : " (position " + (position + 1) + ")";
    const left = run.eta ? sdapi.about(run.eta.seconds - (performance.now() - run.eta.at) / 1000) : "";
    part(run, ".run-note").textContent = waiting
      ? "Waiting for a GPU node to start" + place + "…"
      : "In the queue" + place + (left ? ", done in " + left : "") + "…";
  }

  // The node's estimate of the run, counted down by the steps done.
  function runLeft(run, step, total) {
    if (!run.runEta) return "";
    return sdapi.about(run.runEta * (1 - step / total));
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
    part(run, ".run-note").textContent = "";
  }

  function finish(run, frame) {
    setStatus(run, frame.status);
    const seconds = ((performance.now() - run.submitted) / 1000).toFixed(1);
    const request = run.request;
    if (frame.status === "succeeded") {
      part(run, ".run-note").textContent = "";
      part(run, ".run-meta").textContent = "Seed " + request.seed + " · " + request.steps + " steps · "
        + request.width + "×" + request.height + " · " + request.scheduler
        + (request.loras || []).map((lora) => " · LoRA " + lora.name + " " + lora.weight).join("")
        + " · took " + seconds + " s";
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
        noteQueued(run, frame.position, frame.waiting_for_node, frame.eta_s);
        break;
      case "started":
        if (run.status === "queued") setStatus(run, "running");
        run.runEta = frame.eta_s;
        part(run, ".run-note").textContent = frame.eta_s === null || frame.eta_s === undefined
          ? "" : "Running, done in " + sdapi.about(frame.eta_s) + "…";
        part(run, ".run-progress").hidden = false;
        break;
      case "progress": {
        if (run.status === "queued") setStatus(run, "running");
        part(run, ".run-note").textContent = "";
        const bar = part(run, "progress");
        bar.max = frame.total;
        bar.value = frame.step;
        part(run, ".run-progress").hidden = false;
        const left = frame.step < frame.total ? runLeft(run, frame.step, frame.total) : "";
        part(run, ".steps").textContent = "Step " + frame.step + " of " + frame.total
          + (left ? " · " + left + " left" : "");
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

  firstModels = loadModels(true);
  pollModels();
});
