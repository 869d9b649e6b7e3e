// The bulk page (POST /v1/batches as text/plain) and a batch's page: progress from
// GET /v1/batches/{id}, results from GET /v1/batches/{id}/results, cancel, and retry of
// the failed lines (POST /v1/batches/{id}/retry).
"use strict";

(function () {
  const { api, friendly, showMessage, refreshBalance, balance, plural, make } = window.imgclf;
  const { formatLabel, formatPercent, setBadge } = window.imgclf;

  // --- the new-batch form --------------------------------------------------------

  const form = document.getElementById("bulk-form");
  if (form) {
    const textarea = document.getElementById("urls");
    const fileInput = document.getElementById("url-file");
    const count = document.getElementById("url-count");
    const error = document.getElementById("bulk-error");
    const submit = document.getElementById("bulk-submit");
    const maxUrls = Number(form.dataset.maxUrls);

    // JSON Lines ({"custom_id", "url", "top_k"} per line) when the text starts with "{".
    const isJsonl = () => textarea.value.trimStart().startsWith("{");
    const urlLines = () =>
      textarea.value
        .split(/\r?\n/)
        .map((l) => l.trim())
        .filter((l) => l && (isJsonl() || !l.startsWith("#")));

    const updateCount = () => {
      const n = urlLines().length;
      const have = balance();
      let text = n ? `${plural(n, "URL")} · costs ${plural(n, "token")}` : "No URLs yet";
      if (n && have !== null && n > have) text += ` (you have ${plural(have, "token")})`;
      if (n > maxUrls) text += ` · over the limit of ${maxUrls.toLocaleString("en-US")}`;
      count.textContent = text;
      count.classList.toggle("is-warning", n > maxUrls || (have !== null && n > have));
    };

    textarea.addEventListener("input", () => {
      showMessage(error, "");
      updateCount();
    });

    fileInput.addEventListener("change", async () => {
      const file = fileInput.files[0];
      if (!file) return;
      const text = await file.text();
      if (/\.(jsonl|ndjson)$/i.test(file.name)) {
        textarea.value = text.trim(); // sent as it is: the server numbers its lines
      } else {
        // A CSV's first column, or a plain list.
        const lines = text.split(/\r?\n/).map((line) => line.split(",")[0].trim().replace(/^"|"$/g, ""));
        textarea.value = lines.join("\n").trim();
      }
      fileInput.value = "";
      showMessage(error, "");
      updateCount();
      textarea.focus();
    });

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showMessage(error, "");
      const n = urlLines().length;
      if (!n) {
        showMessage(error, friendly({ code: "empty_batch" }), "error");
        textarea.focus();
        return;
      }
      submit.disabled = true;
      submit.textContent = "Starting…";
      try {
        const batch = await api("/v1/batches", {
          method: "POST",
          body: textarea.value,
          headers: { "Content-Type": isJsonl() ? "application/jsonl" : "text/plain; charset=utf-8" },
        });
        window.location.assign(`/app/batches/${encodeURIComponent(batch.id)}`);
      } catch (err) {
        showMessage(error, friendly(err, { needed: n }), "error");
        textarea.focus();
        submit.disabled = false;
        submit.textContent = "Start batch";
      }
    });
    updateCount();
    return;
  }

  // --- a batch's page --------------------------------------------------------------

  const view = document.getElementById("batch-view");
  if (!view) return;

  const POLL_MS = 800;
  const SHOWN_ROWS = 500;
  const FAILED_SHORT = {
    fetch_failed: "Download failed",
    blocked_address: "Address not allowed",
    not_an_image: "Not an image",
    image_too_large: "Image too large",
    internal_error: "Internal error",
  };

  let batch = JSON.parse(view.dataset.batch);
  const id = batch.id;
  const el = (name) => document.getElementById(name);
  const rows = new Map(); // index -> {tr, status, ...cells}
  let lastCounts = "";
  let resultsLoading = false;
  let resultsStale = false;

  function ended(b) {
    return b.status === "completed" || b.status === "canceled";
  }

  function renderProgress(b) {
    const c = b.counts;
    const done = c.succeeded + c.failed + c.canceled;
    const remaining = c.queued + c.processing;
    const percent = b.total ? Math.floor((done * 100) / b.total) : 100;
    const share = (n) => `${(n * 100) / (b.total || 1)}%`;
    el("progress-ok").style.width = share(c.succeeded);
    el("progress-failed").style.width = share(c.failed);
    el("progress-canceled").style.width = share(c.canceled);
    const bar = el("progress");
    bar.setAttribute("aria-valuenow", String(percent));
    bar.setAttribute("aria-valuetext", `${percent}%, ${done} of ${b.total} done`);
    el("progress-percent").textContent = `${percent}%`;
    const processed = c.succeeded + c.failed;
    el("progress-text").textContent =
      b.status === "canceled"
        ? `Canceled with ${processed.toLocaleString("en-US")} of ${plural(b.total, "image")} processed`
        : `${done.toLocaleString("en-US")} of ${plural(b.total, "image")} done`;
    el("count-succeeded").textContent = c.succeeded.toLocaleString("en-US");
    el("count-failed").textContent = c.failed.toLocaleString("en-US");
    el("count-remaining").textContent = remaining.toLocaleString("en-US");
    el("count-canceled").textContent = c.canceled.toLocaleString("en-US");
    el("canceled-box").hidden = c.canceled === 0;
    setBadge(el("batch-badge"), b.status);
    el("cancel-batch").hidden = ended(b);
    // Failed lines can run again until the batch is canceled (one token each).
    const retry = el("retry-failed");
    retry.hidden = b.status === "canceled" || c.failed === 0;
    retry.textContent = `Retry ${plural(c.failed, "failed image")}`;
    el("delete-batch").hidden = !ended(b);
    view.classList.toggle("is-running", !ended(b));
  }

  function resultCell(row) {
    if (row.status === "succeeded" && row.predictions && row.predictions.length) {
      const top = row.predictions[0];
      return [
        make("span", { class: "top-label", text: formatLabel(top.label) }),
        " ",
        make("span", { class: "muted", text: formatPercent(top.score) }),
      ];
    }
    if (row.status === "failed" && row.error) {
      return [make("span", { class: "error-text", title: friendly(row.error), text: FAILED_SHORT[row.error.code] || "Failed" })];
    }
    return [make("span", { class: "muted", text: "—" })];
  }

  function thumbnail(row) {
    const img = make("img", {
      class: "thumb",
      src: row.url,
      alt: `Image from line ${row.index + 1}`,
      loading: "lazy",
      width: 48,
      height: 48,
      referrerpolicy: "no-referrer",
    });
    img.addEventListener("error", () => {
      img.replaceWith(make("span", { class: "thumb thumb-missing", role: "img", "aria-label": `No preview for line ${row.index + 1}` }));
    }, { once: true });
    return img;
  }

  function renderRow(row) {
    let entry = rows.get(row.index);
    if (!entry) {
      const badge = make("span", { class: "badge" });
      const result = make("td", { class: "result" });
      const tr = make(
        "tr",
        { "data-index": String(row.index) },
        make("td", { class: "num hide-on-phone", text: String(row.index + 1) }),
        make(
          "td",
          { class: "image-cell primary-cell" },
          make(
            "div",
            { class: "image-cell-inner" },
            thumbnail(row),
            make(
              "div",
              {},
              make("a", { class: "url break", href: row.url, rel: "noreferrer", text: row.url }),
              // The caller's own id (JSON Lines input), as the downloads carry it.
              row.custom_id ? make("div", { class: "muted mono custom-id", text: row.custom_id }) : null,
            ),
          ),
        ),
        make("td", {}, badge),
        result,
      );
      entry = { tr, badge, result, status: null };
      rows.set(row.index, entry);
      el("results-body").append(tr);
    }
    if (entry.status !== row.status) {
      entry.status = row.status;
      setBadge(entry.badge, row.status);
      entry.result.replaceChildren(...resultCell(row));
    }
  }

  async function loadResults() {
    if (resultsLoading) {
      resultsStale = true;
      return;
    }
    resultsLoading = true;
    try {
      const response = await fetch(`/v1/batches/${encodeURIComponent(id)}/results`, {
        credentials: "same-origin",
      });
      if (!response.ok) return;
      const text = await response.text();
      const lines = text.split("\n").filter(Boolean);
      for (const line of lines.slice(0, SHOWN_ROWS)) renderRow(JSON.parse(line));
      const note = el("results-note");
      note.hidden = lines.length <= SHOWN_ROWS;
      note.textContent = `Showing the first ${SHOWN_ROWS} of ${lines.length.toLocaleString("en-US")} results; download the file for all of them.`;
    } catch (_err) {
      // The next poll tries again.
    } finally {
      resultsLoading = false;
    }
    if (resultsStale) {
      resultsStale = false;
      await loadResults();
    }
  }

  let polling = false;

  async function poll() {
    if (polling) return;
    polling = true;
    try {
      await pollUntilEnded();
    } finally {
      polling = false;
    }
  }

  async function pollUntilEnded() {
    while (true) {
      try {
        batch = await api(`/v1/batches/${encodeURIComponent(id)}`);
      } catch (err) {
        if (err.code !== "network_error" && err.code !== "service_unavailable") {
          showMessage(el("batch-message"), friendly(err), "error");
          return;
        }
      }
      renderProgress(batch);
      const counts = JSON.stringify(batch.counts);
      if (counts !== lastCounts) {
        lastCounts = counts;
        await loadResults();
      }
      if (ended(batch)) {
        refreshBalance();
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  el("cancel-batch").addEventListener("click", async () => {
    const ok = window.confirm(
      "Cancel this batch? Images that have not started will not be classified and their tokens will be refunded; images already being classified will finish.",
    );
    if (!ok) return;
    const button = el("cancel-batch");
    button.disabled = true;
    try {
      batch = await api(`/v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      renderProgress(batch);
      const n = batch.counts.canceled;
      showMessage(
        el("batch-message"),
        `Batch canceled. ${plural(n, "token")} refunded for images that had not started.`,
        "success",
      );
      await loadResults();
      refreshBalance();
    } catch (err) {
      showMessage(el("batch-message"), friendly(err), "error");
    } finally {
      button.disabled = false;
    }
  });

  el("retry-failed").addEventListener("click", async () => {
    const n = batch.counts.failed;
    const ok = window.confirm(
      `Retry ${plural(n, "failed image")}? Each costs one token again, and is refunded again if it fails again.`,
    );
    if (!ok) return;
    const button = el("retry-failed");
    button.disabled = true;
    try {
      batch = await api(`/v1/batches/${encodeURIComponent(id)}/retry`, { method: "POST" });
      renderProgress(batch);
      showMessage(el("batch-message"), `${plural(batch.retried, "image")} queued again.`, "success");
      refreshBalance();
      lastCounts = "";
      poll();
    } catch (err) {
      showMessage(el("batch-message"), friendly(err, { needed: n, retry: true }), "error");
    } finally {
      button.disabled = false;
    }
  });
  el("delete-batch").addEventListener("click", () =>
    window.imgclf.deleteAndLeave(
      el("delete-batch"),
      `/v1/batches/${encodeURIComponent(id)}`,
      "Delete this batch? All its results are removed for good. Tokens are not refunded.",
      el("batch-message"),
    ),
  );

  renderProgress(batch);
  poll();
})();
