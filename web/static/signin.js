"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("signin-form");
  if (new URLSearchParams(window.location.search).has("reset")) {
    document.getElementById("reset-done").hidden = false;
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    const result = await sdapi.api("POST", "/api/v1/auth/signin", {
      email: form.email.value.trim(),
      password: form.password.value,
      session: true,
    });
    button.disabled = false;
    if (result.ok) {
      const next = new URLSearchParams(window.location.search).get("next");
      window.location.assign(sdapi.localPath(next, "/"));
      return;
    }
    sdapi.showErrors(form, result);
  });
});
