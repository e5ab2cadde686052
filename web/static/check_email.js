"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const email = new URLSearchParams(window.location.search).get("email") || "";
  if (email) document.getElementById("address").textContent = email;
  const form = document.getElementById("resend-form");
  form.email.value = email;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = form.querySelector('[data-error-for="form"]');
    if (!email) {
      status.textContent = "Sign up again to get a new link.";
      return;
    }
    const result = await sdapi.api("POST", "/api/v1/auth/verify/resend", { email });
    status.textContent = result.ok
      ? "If that address has an account waiting for verification, a new link is on its way."
      : (result.data && result.data.error ? result.data.error.message : "Could not send it.");
  });
});
