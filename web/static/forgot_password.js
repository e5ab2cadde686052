"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("forgot-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = await sdapi.api("POST", "/api/v1/auth/password/forgot", {
      email: form.email.value.trim(),
    });
    if (!result.ok) {
      sdapi.showErrors(form, result);
      return;
    }
    sdapi.clearErrors(form);
    form.querySelector('[data-error-for="form"]').textContent =
      "If that address has an account, a link is on its way. It works for an hour.";
  });
});
