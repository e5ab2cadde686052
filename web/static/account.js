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

  async function load() {
    const result = await sdapi.api("GET", "/api/v1/me");
    if (result.ok) show(result.data);
    else sdapi.showErrors(section, result);
  }

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
