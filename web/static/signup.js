"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("signup-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { email: form.email.value.trim(), password: form.password.value };
    if (form.name.value.trim()) body.name = form.name.value.trim();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    const result = await sdapi.api("POST", "/api/v1/auth/signup", body);
    button.disabled = false;
    if (result.ok) {
      window.location.assign("/check-email?email=" + encodeURIComponent(body.email));
      return;
    }
    sdapi.showErrors(form, result);
  });
});
