"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("redeem-form");
  const section = form.closest("section");

  function show(me) {
    document.getElementById("acct-email").textContent = me.email
      + (me.email_verified ? "" : " (not verified yet)");
    document.getElementById("acct-tier").textContent = me.tier;
    document.getElementById("acct-premium").textContent = me.premium_until
      ? sdapi.when(me.premium_until) : "—";
    if (me.quota) {
      document.getElementById("acct-images").textContent = me.quota.images_today + " of "
        + me.quota.images_per_day;
      document.getElementById("acct-flight").textContent = me.quota.in_flight
        + (me.quota.max_in_flight === null ? "" : " of " + me.quota.max_in_flight);
    }
  }

  const profile = document.getElementById("profile-form");
  const nameInput = document.getElementById("profile-name");
  const emailInput = document.getElementById("profile-email");
  const profileNotice = document.getElementById("profile-notice");
  let current = null;

  function fillProfile(me) {
    current = me;
    nameInput.value = me.name || "";
    emailInput.value = me.email;
    profileNotice.textContent = me.pending_email
      ? "We sent a link to " + me.pending_email
        + ": your address changes when you open it."
      : "";
  }

  async function load() {
    const result = await sdapi.api("GET", "/api/v1/me");
    if (result.ok) {
      show(result.data);
      fillProfile(result.data);
    } else {
      sdapi.showErrors(section, result);
    }
  }

  profile.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (current === null) return;
    // Only what changed: an unchanged address must not send another link.
    const body = {};
    const name = nameInput.value.trim();
    const email = emailInput.value.trim();
    if (name !== (current.name || "")) body.name = name === "" ? null : name;
    if (email !== current.email) body.email = email;
    sdapi.clearErrors(profile);
    if (Object.keys(body).length === 0) {
      profileNotice.textContent = "Nothing to change.";
      return;
    }
    const button = profile.querySelector("button[type=submit]");
    button.disabled = true;
    const result = await sdapi.api("PATCH", "/api/v1/me", body);
    button.disabled = false;
    if (!result.ok) {
      sdapi.showErrors(profile, result);
      return;
    }
    show(result.data);
    fillProfile(result.data);
    if (!result.data.pending_email) profileNotice.textContent = "Saved.";
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = await sdapi.api("POST", "/api/v1/premium/redeem", { code: form.code.value.trim() });
    if (!result.ok) {
      sdapi.showErrors(section, result);
      return;
    }
    sdapi.clearErrors(section);
    section.querySelector('[data-error-for="form"]').textContent = "Premium until "
      + sdapi.when(result.data.premium_until) + ". Thank you!";
    form.reset();
    load();
  });

  load();
});
