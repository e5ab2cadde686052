"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("reset-form");
  const token = new URLSearchParams(window.location.search).get("token") || "";
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = await sdapi.api("POST", "/api/v1/auth/password/reset", {
      token,
      password: form.password.value,
    });
    if (!result.ok) {
      sdapi.showErrors(form, result);
      return;
    }
    window.location.assign("/signin?reset=1");
  });
});
