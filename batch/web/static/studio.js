// The studio's only script: live job progress (polling the API) and small form conveniences.
// It writes text with textContent only: nothing from the server is ever parsed as HTML.
"use strict";

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function badge(status) {
  return el("span", "badge " + status.replace(/ /g, "-"), status);
}

const FINAL = ["done", "failed", "cancelled"];

async function pollJob(box) {
  const id = box.dataset.job;
  let job;
  try {
    const response = await fetch("/api/jobs/" + id, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(response.status);
    job = await response.json();
  } catch (err) {
    setTimeout(() => pollJob(box), 3000);
    return;
  }
  if (FINAL.includes(job.status)) {
    window.location.reload(); // the server renders the players and the final log
    return;
  }
  document.getElementById("job-status").replaceChildren(badge(job.status));
  document.getElementById("job-position").textContent = job.position ? "Waiting: #" + job.position + " in line" : "";
  const progress = document.getElementById("progress");
  if (job.progress.length) {
    progress.replaceChildren(...job.progress.map((p) => {
      const row = el("div", "stage");
      const bar = el("progress");
      bar.max = Math.max(p.total, 1);
      bar.value = p.done;
      row.append(el("span", "", p.stage), bar, el("span", "", p.done + "/" + p.total));
      return row;
    }));
  } else {
    progress.replaceChildren(el("p", "empty", job.status === "queued" ? "waiting to start" : "planning"));
  }
  try {
    const log = await fetch(job.log_url);
    if (log.ok) {
      const pre = document.getElementById("log");
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = await log.text();
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
  } catch (err) { /* the next poll tries again */ }
  setTimeout(() => pollJob(box), 1000);
}

async function pollJobs(table) {
  try {
    const response = await fetch(table.dataset.poll, { headers: { Accept: "application/json" } });
    if (response.ok) {
      const jobs = await response.json();
      const known = new Set([...table.querySelectorAll("tr[data-job]")].map((r) => r.dataset.job));
      if (jobs.some((j) => !known.has(String(j.id)))) {
        window.location.reload();
        return;
      }
      for (const job of jobs) {
        const row = table.querySelector('tr[data-job="' + job.id + '"]');
        if (!row) continue;
        const status = row.querySelector('[data-field="status"]');
        status.replaceChildren(badge(job.status));
        if (job.position) status.append(" ", el("span", "pos", "#" + job.position + " in line"));
        row.querySelector('[data-field="progress"]').textContent =
          job.progress.map((p) => p.stage + " " + p.done + "/" + p.total).join(" · ");
        if (FINAL.includes(job.status)) row.querySelector("form")?.remove();
      }
    }
  } catch (err) { /* the next poll tries again */ }
  setTimeout(() => pollJobs(table), 2000);
}

function chooseOnInput(form) {
  // Typing a description or picking a file selects its option.
  for (const input of form.querySelectorAll("[data-choose]")) {
    const [name, value] = input.dataset.choose.split(":");
    const select = () => {
      const radio = form.querySelector('input[type=radio][name="' + name + '"][value="' + value + '"]');
      if (radio) radio.checked = true;
    };
    input.addEventListener("change", select);
    input.addEventListener("input", select);
  }
  const pick = form.querySelector("select[name=pick]");
  if (pick) pick.addEventListener("change", () => { form.querySelector('input[name=character][value=pick]').checked = true; });
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.getElementById("job");
  if (job && !FINAL.includes(job.dataset.status)) setTimeout(() => pollJob(job), 500);
  const jobs = document.querySelector("table.jobs[data-poll]");
  if (jobs) setTimeout(() => pollJobs(jobs), 2000);
  const form = document.getElementById("new-video");
  if (form) chooseOnInput(form);
});
