// Shared by every page: calls to the API with the session's CSRF token, error
// messages beside their fields, and small DOM helpers. User text is only ever
// set with textContent, never parsed as HTML.
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (csrfMeta) headers["X-CSRF-Token"] = csrfMeta.content;
    const init = { method, headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      return { ok: false, status: 0, data: { error: { code: "offline",
        message: "The server cannot be reached; check your connection.", details: [] } } };
    }
    let data = null;
    if (response.status !== 204) {
      try { data = await response.json(); } catch (err) { data = null; }
    }
    return { ok: response.ok, status: response.status, data };
  }

  function clearErrors(root) {
    root.querySelectorAll("[data-error-for]").forEach((node) => { node.textContent = ""; });
    root.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
  }

  // Puts each of the error's `details` beside its field; the rest at "form".
  function showErrors(root, result) {
    clearErrors(root);
    const error = (result.data && result.data.error) || {
      message: "Something went wrong (HTTP " + result.status + ").", details: [] };
    let placed = false;
    for (const detail of error.details || []) {
      const name = String(detail.field || "").split(".").pop();
      const slot = root.querySelector('[data-error-for="' + CSS.escape(name) + '"]');
      if (!slot) continue;
      slot.textContent = detail.message;
      const input = root.querySelector('[name="' + CSS.escape(name) + '"]');
      if (input) input.setAttribute("aria-invalid", "true");
      placed = true;
    }
    const general = root.querySelector('[data-error-for="form"]');
    if (general && (!placed || !(error.details || []).length)) {
      let message = error.message || "";
      if (result.status === 429 || result.status === 503) {
        message += " Try again in a moment.";
      }
      general.textContent = message;
    }
  }

  function el(tag, props, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function when(iso) {
    if (!iso) return "—";
    return new Date(iso).toLocaleString();
  }

  // Only a path of this site may come back from a `next` parameter.
  function localPath(value, fallback) {
    if (typeof value === "string" && value.startsWith("/") && !value.startsWith("//")) {
      return value;
    }
    return fallback;
  }

  // An estimated time in words ("about 12 s", "about 3 min"); "" if unknown.
  function about(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 1) return "under a second";
    if (seconds < 90) return "about " + Math.round(seconds) + " s";
    if (seconds < 5400) return "about " + Math.round(seconds / 60) + " min";
    return "about " + Math.round(seconds / 3600) + " h";
  }

  window.sdapi = { api, clearErrors, showErrors, el, when, about, localPath };

  document.addEventListener("DOMContentLoaded", () => {
    // Submit buttons come disabled: a form sent before its page's script has
    // taken it over would go out as a plain GET, its fields (a password) in
    // the URL. Every page's DOMContentLoaded handler has run by this timer.
    setTimeout(() => {
      for (const button of document.querySelectorAll("[data-needs-script]")) {
        button.disabled = false;
      }
    });
    const signout = document.getElementById("signout");
    if (signout) {
      signout.addEventListener("click", async () => {
        await api("POST", "/api/v1/auth/signout");
        window.location.assign("/signin");
      });
    }
  });
})();
