// The classify page (upload, drag and drop or URL) and the job page: submit through
// POST /v1/jobs, then long-poll GET /v1/jobs/{id}?wait=N and draw the top labels as bars.
"use strict";

(function () {
  const { api, friendly, showMessage, refreshBalance, setBalance, balance, make } = window.imgclf;
  const { formatLabel, formatPercent, setBadge, megabytes } = window.imgclf;

  const FINAL = new Set(["succeeded", "failed", "canceled"]);
  const POLL_WAIT_S = 2;

  const form = document.getElementById("classify-form");
  const jobView = document.getElementById("job-view");
  const badge = document.getElementById("job-badge");
  const state = document.getElementById("job-state");
  const bars = document.getElementById("bars");
  const meta = document.getElementById("job-meta");
  const formError = document.getElementById("classify-error");

  let generation = 0; // a newer submission stops the older one's polling

  function stateLine(text, busy) {
    const line = make("p", { class: busy ? "status-line busy" : "status-line" });
    if (busy) line.append(make("span", { class: "spinner", "aria-hidden": "true" }));
    line.append(make("span", { id: "job-status", text }));
    state.replaceChildren(line);
  }

  function seconds(from, to) {
    if (!from || !to) return null;
    return (new Date(to) - new Date(from)) / 1000;
  }

  function renderBars(predictions) {
    bars.replaceChildren(
      ...predictions.map((p, i) => {
        const pct = Math.max(0, Math.min(100, p.score * 100));
        const fill = make("div", { class: "bar-fill" });
        fill.style.width = `${pct}%`;
        return make(
          "li",
          { class: i === 0 ? "bar top" : "bar", "data-label": p.label, "data-class-id": String(p.class_id) },
          make(
            "div",
            { class: "bar-text" },
            make("span", { class: "bar-label", text: formatLabel(p.label) }),
            make("span", { class: "bar-value", text: formatPercent(p.score) }),
          ),
          make("div", { class: "bar-track", "aria-hidden": "true" }, fill),
        );
      }),
    );
    bars.hidden = predictions.length === 0;
  }

  function renderJob(job) {
    setBadge(badge, job.status);
    if (job.status === "queued") {
      stateLine("Queued: waiting for a worker…", true);
    } else if (job.status === "processing") {
      stateLine("Processing: the model is looking at the image…", true);
    } else if (job.status === "succeeded") {
      const top = job.result.predictions[0];
      stateLine(top ? `Most likely: ${formatLabel(top.label)}` : "No labels were returned.", false);
    } else if (job.status === "failed") {
      const message = `${friendly(job.error || {})} Your token was refunded.`;
      if (form) {
        stateLine("This image could not be classified.", false);
        showMessage(formError, message, "error");
      } else {
        stateLine(message, false);
      }
    } else if (job.status === "canceled") {
      stateLine("This job was canceled and its token refunded.", false);
    }
    renderBars(job.status === "succeeded" ? job.result.predictions : []);

    const parts = [job.model];
    const took = seconds(job.created_at, job.completed_at);
    if (took !== null && FINAL.has(job.status)) parts.push(`finished in ${took.toFixed(1)} s`);
    meta.replaceChildren(parts.join(" · "));
    if (form && job.id) {
      meta.append(" · ", make("a", { href: `/app/jobs/${job.id}`, text: "Job details" }));
    }
  }

  async function follow(job) {
    const mine = ++generation;
    let current = job;
    renderJob(current);
    while (!FINAL.has(current.status)) {
      try {
        current = await api(`/v1/jobs/${encodeURIComponent(current.id)}?wait=${POLL_WAIT_S}`);
      } catch (err) {
        if (mine !== generation) return;
        if (err.code === "network_error" || err.code === "service_unavailable") {
          stateLine("Connection lost; retrying…", true);
          await new Promise((resolve) => setTimeout(resolve, 2000));
          continue;
        }
        stateLine(friendly(err), false);
        return;
      }
      if (mine !== generation) return;
      renderJob(current);
    }
    if (form) refreshBalance();
    return current;
  }

  // --- the job page --------------------------------------------------------------

  if (jobView) {
    const job = JSON.parse(jobView.dataset.job);
    const remove = document.getElementById("delete-job"); // absent for a batch's job
    follow(job).then((done) => {
      if (remove && done && FINAL.has(done.status)) remove.hidden = false;
    });
    remove?.addEventListener("click", () =>
      window.imgclf.deleteAndLeave(
        remove,
        `/v1/jobs/${encodeURIComponent(job.id)}`,
        "Delete this job? Its image and result are removed for good. Tokens are not refunded.",
        document.getElementById("delete-message"),
      ),
    );
    return;
  }
  if (!form) return;

  // --- the classify form ---------------------------------------------------------

  const maxBytes = Number(form.dataset.maxBytes);
  const fileInput = document.getElementById("file");
  const urlInput = document.getElementById("url");
  const dropzone = document.getElementById("dropzone");
  const preview = document.getElementById("preview");
  const previewImg = document.getElementById("preview-img");
  const previewName = document.getElementById("preview-name");
  const clearButton = document.getElementById("preview-clear");
  const submitButton = document.getElementById("classify-submit");

  let selectedFile = null;
  let objectUrl = null;
  let urlTimer = null;

  function sizeText(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1048576) return `${Math.round(bytes / 1024)} KB`;
    return `${(bytes / 1048576).toFixed(1)} MB`;
  }

  function showPreview(src, name, alt) {
    previewImg.hidden = false;
    previewImg.alt = alt;
    previewImg.src = src;
    previewName.textContent = name;
    preview.hidden = false;
  }

  function clearPreview() {
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = null;
    preview.hidden = true;
    previewImg.removeAttribute("src");
    previewName.textContent = "";
  }

  function setFile(file) {
    selectedFile = file;
    urlInput.value = "";
    showMessage(formError, "");
    clearPreview();
    if (!file) return;
    objectUrl = URL.createObjectURL(file);
    showPreview(objectUrl, `${file.name} · ${sizeText(file.size)}`, `Preview of ${file.name}`);
  }

  previewImg.addEventListener("error", () => {
    if (!previewImg.getAttribute("src")) return;
    // Not displayable here: a file keeps its name (it is the only sign of the choice);
    // a link's preview goes away (the server may still fetch what the browser cannot show).
    if (selectedFile) previewImg.hidden = true;
    else preview.hidden = true;
  });

  fileInput.addEventListener("change", () => setFile(fileInput.files[0] || null));

  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"));
  }
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || !files.length) return;
    try {
      fileInput.files = files;
    } catch (_err) {
      // Older browsers cannot assign files; the selection below is what gets sent.
    }
    setFile(files[0]);
  });

  urlInput.addEventListener("input", () => {
    if (selectedFile) {
      selectedFile = null;
      fileInput.value = "";
    }
    showMessage(formError, "");
    clearTimeout(urlTimer);
    const url = urlInput.value.trim();
    if (!/^https?:\/\/\S+$/i.test(url)) {
      clearPreview();
      return;
    }
    urlTimer = setTimeout(() => showPreview(url, "Preview of the linked image", `Preview of ${url}`), 300);
  });

  clearButton.addEventListener("click", () => {
    setFile(null);
    fileInput.value = "";
    urlInput.value = "";
    fileInput.focus();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showMessage(formError, "");
    const url = urlInput.value.trim();
    const fail = (err, focus) => {
      showMessage(formError, friendly(err, { maxBytes }), "error");
      if (focus) focus.focus();
    };
    if (!selectedFile && !url) return fail({ code: "missing_input" }, fileInput);
    if (selectedFile && selectedFile.size > maxBytes) return fail({ code: "payload_too_large" }, fileInput);
    if (selectedFile && selectedFile.size === 0) return fail({ code: "empty_file" }, fileInput);
    if (!selectedFile && !/^https?:\/\/\S+$/i.test(url)) return fail({ code: "invalid_url" }, urlInput);

    submitButton.disabled = true;
    submitButton.textContent = "Sending…";
    let job;
    try {
      if (selectedFile) {
        const data = new FormData();
        data.append("file", selectedFile, selectedFile.name);
        job = await api("/v1/jobs", { method: "POST", body: data });
      } else {
        job = await api("/v1/jobs", { method: "POST", json: { url } });
      }
    } catch (err) {
      fail(err);
      if (err.code === "insufficient_tokens") setBalance(0);
      return;
    } finally {
      submitButton.disabled = false;
      submitButton.textContent = "Classify";
    }
    const tokens = balance();
    if (tokens !== null) setBalance(Math.max(0, tokens - 1));
    if (window.matchMedia("(max-width: 760px)").matches) {
      // One column: the result is below the form, out of sight.
      document.querySelector(".result-card").scrollIntoView({ block: "start" });
    }
    follow(job);
  });
})();
