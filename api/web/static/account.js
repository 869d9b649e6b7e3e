// API keys on the account page: list (GET /v1/keys), create (POST), revoke (DELETE).
"use strict";

(function () {
  const { api, friendly, showMessage, make, localTime } = window.imgclf;

  const form = document.getElementById("key-form");
  const nameInput = document.getElementById("key-name");
  const body = document.getElementById("keys-body");
  const message = document.getElementById("keys-message");
  const box = document.getElementById("new-key");
  const keyValue = document.getElementById("new-key-value");
  const curl = document.getElementById("curl-example");

  function timeCell(iso, fallback) {
    if (!iso) return make("td", { class: "muted", text: fallback });
    return make("td", {}, make("time", { datetime: iso, title: iso, text: localTime(iso) }));
  }

  function keyRow(key) {
    const name = key.name || "Unnamed key";
    const revoke = make("button", {
      type: "button",
      class: "link-button danger-link",
      text: "Revoke",
      "aria-label": `Revoke the key “${name}” (${key.prefix}…)`,
    });
    revoke.addEventListener("click", () => revokeKey(key, name));
    return make(
      "tr",
      { "data-key-id": key.id },
      make("td", { text: name }),
      make("td", {}, make("code", { class: "key-prefix", text: `${key.prefix}…` })),
      timeCell(key.created_at, "—"),
      timeCell(key.last_used_at, "Never"),
      make("td", { class: "actions-cell" }, revoke),
    );
  }

  async function loadKeys() {
    try {
      const data = await api("/v1/keys");
      if (!data.items.length) {
        body.replaceChildren(
          make("tr", {}, make("td", { colspan: "5", class: "muted", text: "No active keys. Create one above." })),
        );
        return;
      }
      body.replaceChildren(...data.items.map(keyRow));
    } catch (err) {
      body.replaceChildren(make("tr", {}, make("td", { colspan: "5", class: "error-text", text: friendly(err) })));
    }
  }

  async function revokeKey(key, name) {
    if (!window.confirm(`Revoke the key “${name}”? Programs using it will stop working at once.`)) return;
    try {
      await api(`/v1/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      showMessage(message, `Revoked the key “${name}”. Requests using it are now refused.`, "success");
      if (keyValue.textContent.startsWith(key.prefix)) box.hidden = true;
      await loadKeys();
      nameInput.focus();
    } catch (err) {
      showMessage(message, friendly(err), "error");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showMessage(message, "");
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const created = await api("/v1/keys", { method: "POST", json: { name: nameInput.value.trim() } });
      keyValue.textContent = created.key;
      curl.textContent = curl.textContent.replace(/Bearer [^"]*"/, `Bearer ${created.key}"`);
      box.querySelector(".new-key-title strong").textContent = "Your new API key.";
      box.hidden = false;
      nameInput.value = "";
      showMessage(message, `Created the key “${created.name || "Unnamed key"}”.`, "success");
      box.querySelector("button[data-copy]").focus();
      await loadKeys();
    } catch (err) {
      showMessage(message, friendly(err), "error");
    } finally {
      button.disabled = false;
    }
  });

  loadKeys();
})();
