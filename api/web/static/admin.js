// Refill a user's tokens from the admin page through POST /v1/admin/refill.
"use strict";

(function () {
  const { api, friendly, showMessage, plural, setBalance } = window.imgclf;
  const message = document.getElementById("admin-message");

  for (const form of document.querySelectorAll(".refill-form")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const username = form.dataset.username;
      const input = form.elements.amount;
      const amount = Number(input.value);
      if (!Number.isInteger(amount) || amount < 1 || amount > 1000000) {
        showMessage(message, "Enter a whole number of tokens from 1 to 1,000,000.", "error");
        input.focus();
        return;
      }
      const button = form.querySelector("button");
      button.disabled = true;
      try {
        const result = await api("/v1/admin/refill", { method: "POST", json: { username, amount } });
        form.closest("tr").querySelector(".user-tokens").textContent = result.tokens.toLocaleString("en-US");
        showMessage(
          message,
          `Added ${plural(amount, "token")} to ${username}. New balance: ${plural(result.tokens, "token")}.`,
          "success",
        );
        const me = document.querySelector(".session .username");
        if (me && me.textContent === username) setBalance(result.tokens);
      } catch (err) {
        showMessage(message, friendly(err), "error");
      } finally {
        button.disabled = false;
      }
    });
  }
})();
