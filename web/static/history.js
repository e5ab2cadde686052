// History: the user's generations, newest first, a page at a time.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const list = document.getElementById("history");
  const template = document.getElementById("history-template");
  const more = document.getElementById("more");
  const section = list.closest("section");
  let next = null;

  function params(request) {
    return request.width + "×" + request.height + " · " + request.steps + " steps · guidance "
      + request.guidance_scale + " · " + request.scheduler + " · seed " + request.seed + " · "
      + request.model + (request.negative_prompt ? " · not: " + request.negative_prompt : "");
  }

  function note(generation) {
    switch (generation.status) {
      case "scheduled":
        return "Runs at " + sdapi.when(generation.scheduled_for) + "; emailed when done.";
      case "queued":
        return generation.waiting_for_node ? "Waiting for a GPU node."
          : "In the queue." + (generation.eta_s === null ? "" : " Done in " + sdapi.about(generation.eta_s) + ".");
      case "running":
        return (generation.progress
          ? "Step " + generation.progress.step + " of " + generation.progress.total + "."
          : "Running.") + (generation.eta_s === null ? "" : " Done in " + sdapi.about(generation.eta_s) + ".");
      case "failed":
        return "Failed: " + (generation.error ? generation.error.message : "unknown reason");
      case "succeeded":
        return generation.emailed_at ? "Emailed " + sdapi.when(generation.emailed_at) + "." : "";
      default:
        return "";
    }
  }

  function render(generation) {
    const item = template.content.firstElementChild.cloneNode(true);
    item.dataset.id = generation.id;
    item.querySelector(".run-prompt").textContent = generation.request.prompt;
    const status = item.querySelector(".status");
    status.textContent = generation.status;
    status.className = "status " + generation.status;
    item.querySelector(".params").textContent = sdapi.when(generation.created_at) + " · "
      + params(generation.request);
    item.querySelector(".run-note").textContent = note(generation);
    const thumbs = item.querySelector(".thumbs");
    const downloads = item.querySelector(".downloads");
    if (generation.images.length) {
      for (const image of generation.images) {
        thumbs.append(sdapi.el("img", {
          src: image.url,
          alt: "Image " + (image.index + 1) + " for: " + generation.request.prompt,
          title: generation.request.prompt,
          loading: "lazy",
        }));
        downloads.append(sdapi.el("a", {
          href: image.url, download: "sdapi-" + generation.id + "-" + image.index + ".png",
        }, "Download image " + (image.index + 1)));
      }
    } else {
      thumbs.append(sdapi.el("div", { class: "placeholder", "aria-hidden": "true" }));
    }
    const unfinished = ["scheduled", "queued", "running"].includes(generation.status);
    const cancel = item.querySelector(".cancel");
    const remove = item.querySelector(".delete");
    cancel.hidden = !unfinished;
    remove.hidden = unfinished;
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      const result = await sdapi.api("DELETE", "/api/v1/generations/" + generation.id);
      if (!result.ok) {
        sdapi.showErrors(section, result);
        cancel.disabled = false;
        return;
      }
      const fresh = await sdapi.api("GET", "/api/v1/generations/" + generation.id);
      if (fresh.ok) item.replaceWith(render(fresh.data));
    });
    remove.addEventListener("click", async () => {
      if (!window.confirm("Delete this generation and its images for good?")) return;
      const result = await sdapi.api("DELETE", "/api/v1/generations/" + generation.id + "?purge=true");
      if (!result.ok) {
        sdapi.showErrors(section, result);
        return;
      }
      item.remove();
    });
    return item;
  }

  async function load() {
    const query = new URLSearchParams({ limit: "20" });
    if (next) query.set("before", next);
    const result = await sdapi.api("GET", "/api/v1/generations?" + query.toString());
    if (!result.ok) {
      sdapi.showErrors(section, result);
      return;
    }
    for (const generation of result.data.items) list.append(render(generation));
    next = result.data.next;
    more.hidden = !next;
    document.getElementById("history-empty").hidden = list.children.length > 0;
  }

  more.addEventListener("click", load);
  load();
});
