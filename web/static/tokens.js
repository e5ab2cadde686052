// API tokens: create (the secret shown once, with ready-to-paste snippets),
// list and revoke.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("token-form");
  const rows = document.getElementById("token-rows");
  const section = form.closest("section");

  function row(token) {
    const tr = sdapi.el("tr");
    tr.dataset.id = token.id;
    tr.append(
      sdapi.el("td", {}, token.name),
      sdapi.el("td", {}, sdapi.when(token.created_at)),
      sdapi.el("td", {}, token.last_used_at ? sdapi.when(token.last_used_at) : "never"),
      sdapi.el("td", {}, sdapi.when(token.expires_at)),
    );
    const cell = sdapi.el("td");
    const revoke = sdapi.el("button", { type: "button", "aria-label": "Revoke " + token.name }, "Revoke");
    revoke.addEventListener("click", async () => {
      if (!window.confirm("Revoke “" + token.name + "”? Scripts using it stop at once.")) return;
      const result = await sdapi.api("DELETE", "/api/v1/tokens/" + token.id);
      if (!result.ok) {
        sdapi.showErrors(section, result);
        return;
      }
      tr.remove();
    });
    cell.append(revoke);
    tr.append(cell);
    return tr;
  }

  async function load() {
    const result = await sdapi.api("GET", "/api/v1/tokens");
    if (!result.ok) {
      sdapi.showErrors(section, result);
      return;
    }
    rows.replaceChildren(...result.data.items.map(row));
    if (!result.data.items.length) {
      const empty = sdapi.el("tr");
      empty.append(sdapi.el("td", { colspan: "5", class: "muted" }, "No tokens yet."));
      rows.append(empty);
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sdapi.clearErrors(section);
    const body = { name: form.name.value.trim() };
    if (form.expires_at.value) {
      body.expires_at = new Date(form.expires_at.value + "T23:59:59").toISOString();
    }
    const result = await sdapi.api("POST", "/api/v1/tokens", body);
    if (!result.ok) {
      sdapi.showErrors(section, result);
      return;
    }
    const secret = result.data.token;
    const base = window.location.origin;
    document.getElementById("new-secret").textContent = secret;
    document.getElementById("curl-snippet").textContent =
      "curl " + base + "/api/v1/generations \\\n"
      + "  -H 'Authorization: Bearer " + secret + "' \\\n"
      + "  -H 'Content-Type: application/json' \\\n"
      + "  -d '{\"prompt\": \"a lighthouse at dusk\"}'";
    document.getElementById("openai-snippet").textContent =
      "from openai import OpenAI\n\n"
      + "client = OpenAI(\n"
      + "    base_url=\"" + base + "/v1\",\n"
      + "    api_key=\"" + secret + "\",\n"
      + ")\n"
      + "result = client.images.generate(\n"
      + "    prompt=\"a lighthouse at dusk\", response_format=\"b64_json\"\n"
      + ")\n"
      + "print(len(result.data), \"image(s)\")";
    document.getElementById("new-token").hidden = false;
    form.reset();
    load();
  });

  load();
});
