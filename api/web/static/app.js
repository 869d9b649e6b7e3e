// Shared helpers for every page: calling /v1, readable error messages, the token
// balance in the header, local times and copy buttons. Exposed as window.imgclf.
"use strict";

(function () {
  const FORMATS = "JPEG, PNG, GIF, WebP or BMP";

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details || {};
    }
  }

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // fetch() a /v1 endpoint with the session cookie; JSON in and out; errors become ApiError.
  async function api(path, options = {}) {
    const method = options.method || "GET";
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    let body = options.body;
    if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(options.json);
    }
    let response;
    try {
      response = await fetch(path, { method, body, headers, credentials: "same-origin" });
    } catch (_err) {
      throw new ApiError(0, "network_error", "The server could not be reached.");
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (_err) {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(
        response.status,
        error.code || `http_${response.status}`,
        error.message || response.statusText,
        error.details,
      );
    }
    return data;
  }

  function plural(n, word) {
    return `${Number(n).toLocaleString("en-US")} ${word}${n === 1 ? "" : "s"}`;
  }

  function megabytes(bytes) {
    return `${Math.round(bytes / 1048576)} MB`;
  }

  function listNumbers(numbers) {
    if (numbers.length === 1) return String(numbers[0]);
    return `${numbers.slice(0, -1).join(", ")} and ${numbers[numbers.length - 1]}`;
  }

  function balance() {
    const el = document.getElementById("token-balance");
    return el ? Number(el.dataset.tokens) : null;
  }

  // A sentence a person can act on, for an API error or a failed job's error.
  // context: {needed: tokens the request needed, maxBytes: upload limit}.
  function friendly(err, context = {}) {
    const details = err.details || {};
    const have = balance();
    switch (err.code) {
      case "insufficient_tokens": {
        const needed = context.needed || 1;
        if (context.retry) {
          return `Not enough tokens: retrying needs ${plural(needed, "token")} and you have ${plural(have ?? 0, "token")}. Ask an administrator to refill your balance.`;
        }
        if (needed > 1) {
          return `Not enough tokens: this batch needs ${plural(needed, "token")} and you have ${plural(have ?? 0, "token")}. Remove some URLs, or ask an administrator to refill your balance.`;
        }
        return "You’re out of tokens. Each image costs one token; ask an administrator to refill your balance.";
      }
      case "unsupported_image_format":
      case "unsupported_media_type":
        return `That file isn’t an image we can read. Choose a ${FORMATS} file.`;
      case "payload_too_large":
        return `That file is too large. Images can be up to ${megabytes(context.maxBytes || 20971520)}.`;
      case "empty_file":
        return "That file is empty. Choose another image.";
      case "missing_input":
        return "Choose an image file or paste an image URL first.";
      case "invalid_url":
        return "That isn’t a web address we can fetch. Paste a full URL that starts with http:// or https://.";
      case "ambiguous_input":
        return "Use either a file or a URL, not both.";
      case "fetch_failed":
        return "We couldn’t download an image from that URL. Check the address and that the site is reachable.";
      case "blocked_address":
        return "That URL points to a private or local network address, which isn’t allowed.";
      case "not_an_image":
        return `That URL doesn’t lead to an image we can read. Link directly to a ${FORMATS} file.`;
      case "image_too_large":
        return "That image is too large to classify (the limit is 20 MB and 40 megapixels).";
      case "upload_expired":
        return "The upload expired before it could be classified. Please try again.";
      case "internal_error":
        return "Something went wrong while classifying this image. Please try again.";
      case "invalid_urls": {
        const lines = details.lines || [];
        const count = details.count || lines.length;
        const more = count > lines.length ? ` and ${count - lines.length} more` : "";
        const which = lines.length === 1 && !more
          ? `Line ${lines[0]} isn’t a web address.`
          : `Lines ${listNumbers(lines)}${more} aren’t web addresses.`;
        return `${which} Each line must be a full URL that starts with http:// or https://. Nothing was charged.`;
      }
      case "empty_batch":
        return "Add at least one image URL, one per line.";
      case "too_many_urls":
        return `${err.message} Split the list into smaller batches.`;
      case "service_unavailable":
        return "The service is temporarily unavailable. Nothing was charged; please try again in a moment.";
      case "unauthorized":
      case "invalid_credentials":
      case "invalid_api_key":
        return "Your session has ended. Log in again to continue.";
      case "csrf_failed":
        return "This page has expired. Reload it and try again.";
      case "network_error":
        return "The server could not be reached. Check your connection and try again.";
      case "admin_required":
        return "Only administrators can do that.";
      case "user_not_found":
        return "There is no user with that name.";
      case "nothing_to_retry":
        return "No image in this batch failed, so there is nothing to retry.";
      case "batch_canceled":
        return "This batch was canceled, so its images can’t be retried. Submit them as a new batch.";
      case "invalid_lines": {
        const lines = details.lines || [];
        const count = details.count || lines.length;
        const more = count > lines.length ? ` and ${count - lines.length} more` : "";
        return `Lines ${listNumbers(lines)}${more} aren’t valid. ${err.message} Nothing was charged.`;
      }
      case "batch_not_cancelable":
        return "This batch has already finished, so there is nothing left to cancel.";
      case "job_not_cancelable":
        return "This job has already started, so it can’t be canceled.";
      case "job_not_finished":
        return "This job hasn’t finished yet. Cancel it or wait for it to finish, then delete it.";
      case "job_in_batch":
        return "This image is part of a batch. Delete the whole batch from its page.";
      case "batch_running":
        return "Some images of this batch are still being classified. Cancel the batch or wait for them to finish, then delete it.";
      case "validation_error": {
        const fields = details.fields || {};
        const parts = Object.entries(fields).map(
          ([field, messages]) => `${field.replace(/_/g, " ")}: ${[].concat(messages).join(" ")}`,
        );
        return parts.length ? `Please check ${parts.join("; ")}` : "Please check the form and try again.";
      }
      default:
        return err.message || "Something went wrong. Please try again.";
    }
  }

  function setBalance(tokens) {
    for (const id of ["token-balance", "account-tokens"]) {
      const el = document.getElementById(id);
      if (el) {
        el.dataset.tokens = String(tokens);
        el.textContent = plural(tokens, "token");
      }
    }
  }

  async function refreshBalance() {
    try {
      const me = await api("/v1/me");
      setBalance(me.tokens);
    } catch (_err) {
      // The balance in the header is a convenience; the next page load corrects it.
    }
  }

  function showMessage(el, message, kind) {
    if (!el) return;
    el.textContent = message || "";
    el.hidden = !message;
    el.classList.toggle("is-error", kind === "error");
    el.classList.toggle("is-success", kind === "success");
  }

  function announce(message) {
    const live = document.getElementById("live");
    if (live) live.textContent = message;
  }

  function formatLabel(label) {
    return String(label || "").replace(/_/g, " ");
  }

  function formatPercent(score) {
    const pct = score * 100;
    if (pct > 0 && pct < 0.1) return "<0.1%";
    return `${pct.toFixed(1)}%`;
  }

  const STATUS_NAMES = {
    queued: "Queued",
    processing: "Processing",
    running: "Running",
    succeeded: "Succeeded",
    completed: "Completed",
    failed: "Failed",
    canceled: "Canceled",
  };

  function setBadge(el, status) {
    if (!el) return;
    el.hidden = false;
    el.textContent = STATUS_NAMES[status] || status;
    el.className = `badge status-${status}`;
  }

  function localTime(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return iso;
    return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  function localizeTimes(root) {
    for (const el of root.querySelectorAll("time[datetime]")) {
      el.title = el.textContent;
      el.textContent = localTime(el.getAttribute("datetime"));
    }
  }

  function make(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key in el && typeof value !== "string") el[key] = value;
      else el.setAttribute(key, value);
    }
    el.append(...children.filter((c) => c !== null && c !== undefined));
    return el;
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = make("textarea", { class: "offscreen", readonly: "" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  // DELETE a finished job or batch after the user confirms, then go to the history.
  async function deleteAndLeave(button, path, question, messageEl) {
    if (!window.confirm(question)) return;
    button.disabled = true;
    try {
      await api(path, { method: "DELETE" });
      window.location.assign("/app/history");
    } catch (err) {
      showMessage(messageEl, friendly(err), "error");
      button.disabled = false;
    }
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-copy]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copy);
    try {
      await copyText(source.textContent.trim());
      button.textContent = "Copied";
      announce("Copied to the clipboard.");
    } catch (_err) {
      button.textContent = "Select and copy";
      announce("Copying failed; select the text and copy it yourself.");
    }
    setTimeout(() => {
      button.textContent = "Copy";
    }, 2000);
  });

  localizeTimes(document);

  window.imgclf = {
    api,
    ApiError,
    friendly,
    plural,
    megabytes,
    balance,
    setBalance,
    refreshBalance,
    showMessage,
    announce,
    formatLabel,
    formatPercent,
    setBadge,
    localTime,
    localizeTimes,
    make,
    deleteAndLeave,
  };
})();
