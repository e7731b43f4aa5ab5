// The mock panel's pages. Plain JavaScript, no build step, no library.
//
// The pages call the panel's own JSON routes (/panel/api/...), which call the nodes with
// their master tokens (client.py). The browser talks to a node directly only with a
// temporary token the panel minted for that one thing: the console's WebSocket (one
// server, 15 minutes, single use), an upload or a download link (one volume, a minute,
// single use). Text from nodes goes in with textContent only.
"use strict";

const VENDOR = "Application/vnd.pkglatv1+json";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function button(label, onclick, cls) {
  const b = el("button", {type: "button", class: cls || "small"}, label);
  b.addEventListener("click", onclick);
  return b;
}

async function api(method, path, body) {
  const init = {method, cache: "no-store", headers: {}};
  if (method !== "GET") init.headers["X-Panel"] = "1";
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch("/panel/api" + path, init);
  let answer = null;
  try { answer = await response.json(); } catch (err) { answer = null; }
  if (!response.ok) {
    const error = new Error((answer && answer.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return answer;
}

let noticeTimer = null;
function notice(text, isError) {
  const box = document.getElementById("notice");
  if (!box) return;
  box.textContent = text;
  box.className = "shown" + (isError ? " error" : "");
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { box.className = ""; }, isError ? 8000 : 3000);
}

async function guarded(what, work) {
  try {
    const result = await work();
    return result;
  } catch (err) {
    notice(`${what}: ${err.message}`, true);
    return undefined;
  }
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function when(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "–";
}

function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  return s < 90 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

function portsText(ports) {
  return (ports || []).map((p) => `${p.ip}:${p.port}/${p.protocol}`).join(", ");
}

function stateOf(server) {
  return server.install_state === "ready" ? server.state : server.install_state;
}

// --- nodes (the page at /, page.html) -----------------------------------------------------

async function renderFleet() {
  const root = document.getElementById("fleet");
  if (!root) return;
  let answer;
  try { answer = await api("GET", "/nodes"); } catch (err) {
    if (err.status === 404) { root.hidden = true; return; }  // the panel drives no node
    throw err;
  }
  root.hidden = false;
  const body = root.querySelector("tbody");
  body.replaceChildren();
  for (const node of answer.nodes) {
    const u = node.utilization;
    const row = el("tr", {"data-fleet-node": node.name});
    row.append(el("td", {class: "name"}, node.name));
    row.append(el("td", {class: "state", "data-state": node.reachable ? "running" : "unreachable"},
      node.reachable ? `up${node.events_live ? " · live events" : " · polled"}` : `unreachable: ${node.error || "?"}`));
    row.append(el("td", {class: "num"}, u ? `${u.cpu_percent.toFixed(1)} % of ${u.cpu_count}` : "–"));
    row.append(el("td", {class: "num"}, u ? `${bytes(u.memory.used)} / ${bytes(u.memory.total)}` : "–"));
    row.append(el("td", {class: "num"}, u ? `${bytes(u.disk.used)} / ${bytes(u.disk.total)}` : "–"));
    row.append(el("td", {class: "num"}, u ? `${u.containers.running} / ${u.containers.total}` : node.servers));
    row.append(el("td", {class: "heartbeat"}, ago(node.last_health)));
    row.append(el("td", {class: "mono"}, `${node.url}${node.agent_version ? " · v" + node.agent_version : ""}`));
    body.append(row);
  }
}

function startFleet() {
  const tick = () => renderFleet().catch(() => {});
  tick();
  setInterval(tick, 2000);
}

// --- servers -------------------------------------------------------------------------------

async function renderServers() {
  const answer = await api("GET", "/servers");
  const down = answer.nodes.filter((n) => !n.reachable);
  document.getElementById("summary").textContent =
    `${answer.servers.length} server(s) on ${answer.nodes.length} node(s)` +
    (down.length ? ` · unreachable: ${down.map((n) => n.name).join(", ")}` : "");
  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  if (answer.servers.length === 0) {
    const row = el("tr");
    row.append(el("td", {colspan: "6", class: "empty"}, "No server yet: create one."));
    body.append(row);
  }
  for (const s of answer.servers) {
    const row = el("tr", {"data-server": s.internal_id, "data-node": s.node});
    const link = el("a", {href: `/servers/${encodeURIComponent(s.node)}/${encodeURIComponent(s.internal_id)}`}, s.internal_id);
    const name = el("td");
    name.append(link);
    row.append(name);
    row.append(el("td", {}, s.node));
    row.append(el("td", {class: "install", "data-state": s.install_state}, s.install_state));
    row.append(el("td", {class: "state", "data-state": stateOf(s)}, stateOf(s)));
    row.append(el("td", {class: "mono"}, s.image));
    row.append(el("td", {class: "mono"}, portsText(s.ports)));
    body.append(row);
  }
}

function startServers() {
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try { await renderServers(); } catch (err) { notice(err.message, true); } finally { busy = false; }
  };
  tick();
  setInterval(tick, 1000);
}

// --- create server -------------------------------------------------------------------------

async function loadOptions(node) {
  const ports = document.getElementById("ports");
  const images = document.getElementById("images");
  const volumes = document.getElementById("volume_id");
  ports.textContent = "loading…";
  const options = await guarded("Node options", () => api("GET", `/nodes/${encodeURIComponent(node)}/options`));
  if (!options) { ports.textContent = "the node does not answer"; return; }
  images.replaceChildren(...options.images.map((tag) => el("option", {value: tag})));
  const image = document.getElementById("image");
  if (!image.value && options.images.length) image.value = options.images[0];
  volumes.replaceChildren(el("option", {value: ""}, "a new volume"),
    ...options.volumes.map((v) => el("option", {value: v.volume_id}, `${v.volume_id} (${when(v.created_at)})`)));
  ports.replaceChildren();
  if (options.ports.length === 0) ports.textContent = "no free port in the pool (the server gets none)";
  options.ports.forEach((p, i) => {
    const box = el("input", {type: "checkbox", name: "port", value: JSON.stringify({ip: p.ip, port: p.port, protocol: p.protocol})});
    if (i === 0) box.checked = true;
    const label = el("label", {class: "meta", style: "display:inline-block;margin-right:1rem;font-weight:400"});
    label.append(box, ` ${p.ip}:${p.port}/${p.protocol}`);
    ports.append(label);
  });
}

async function startCreate() {
  const nodes = await guarded("Nodes", () => api("GET", "/nodes"));
  const select = document.getElementById("node");
  for (const node of (nodes ? nodes.nodes : [])) select.append(el("option", {value: node.name}, node.name));
  if (select.value) await loadOptions(select.value);
  select.addEventListener("change", () => loadOptions(select.value));
  const id = document.getElementById("internal_id");
  if (!id.value) id.value = "server-" + Math.random().toString(16).slice(2, 8);
  document.getElementById("create").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const data = Object.fromEntries(new FormData(form).entries());
    delete data.port;
    data.ports = [...form.querySelectorAll("input[name=port]:checked")].map((b) => JSON.parse(b.value));
    data.start_on_completion = document.getElementById("start_on_completion").checked;
    const status = document.getElementById("create-status");
    const submit = document.getElementById("create-button");
    submit.disabled = true;
    status.textContent = "creating…";
    const made = await guarded("Create", () => api("POST", `/nodes/${encodeURIComponent(select.value)}/servers`, data));
    submit.disabled = false;
    if (!made) { status.textContent = ""; return; }
    location.assign(`/servers/${encodeURIComponent(made.node)}/${encodeURIComponent(made.internal_id)}`);
  });
}

// --- one server ----------------------------------------------------------------------------

class Chart {
  // A line chart of the last `size` samples on a canvas; `max` fixes the top (else auto).
  constructor(canvas, color, size) {
    this.canvas = canvas;
    this.color = color;
    this.size = size || 60;
    this.values = [];
  }

  push(value, max) {
    this.values.push(value);
    if (this.values.length > this.size) this.values.shift();
    this.draw(max);
  }

  draw(max) {
    const c = this.canvas.getContext("2d");
    const w = this.canvas.width;
    const h = this.canvas.height;
    c.clearRect(0, 0, w, h);
    c.strokeStyle = "#e3e6eb";
    c.lineWidth = 1;
    for (let i = 1; i < 4; i++) {
      c.beginPath(); c.moveTo(0, (h * i) / 4); c.lineTo(w, (h * i) / 4); c.stroke();
    }
    const top = max || Math.max(1, ...this.values) * 1.2;
    c.strokeStyle = this.color;
    c.lineWidth = 2;
    c.beginPath();
    this.values.forEach((v, i) => {
      const x = (w * i) / (this.size - 1);
      const y = h - 2 - ((h - 4) * Math.min(v, top)) / top;
      if (i === 0) c.moveTo(x, y); else c.lineTo(x, y);
    });
    c.stroke();
  }
}

function serverPage() {
  const parts = location.pathname.split("/").map(decodeURIComponent);
  const node = parts[2];
  const id = parts[3];
  const base = `/nodes/${encodeURIComponent(node)}/servers/${encodeURIComponent(id)}`;
  const page = {node, id, base, gone: false, ws: null, cwd: "", server: null, tab: "console"};
  window.lightdPanel = page;  // for people poking at it in the console, and the tests
  document.title = `${id} · Lightd mock panel`;
  document.getElementById("title").textContent = id;

  // -- state: polled from the panel, and pushed by the WebSocket's status/event frames --
  function showState(state) {
    const badge = document.getElementById("state");
    badge.textContent = state;
    badge.dataset.state = state;
    const running = ["starting", "running", "stopping"].includes(state);
    document.getElementById("power-start").disabled = state !== "offline";
    document.getElementById("power-stop").disabled = !running;
    document.getElementById("power-restart").disabled = !(state === "offline" || running);
    document.getElementById("power-kill").disabled = !running;
  }

  async function refresh() {
    if (page.gone) return;
    let answer;
    try {
      answer = await api("GET", base);
    } catch (err) {
      if (err.status === 404) return markGone();
      document.getElementById("facts").textContent = `the node does not answer: ${err.message}`;
      return;
    }
    const s = answer.server;
    const before = page.server ? stateOf(page.server) : null;
    page.server = s;
    page.volume = answer.volume;
    const limits = s.limits || {};
    const v = answer.volume;
    document.getElementById("facts").textContent =
      `${node} · ${s.image} · ${portsText(s.ports) || "no ports"} · memory ${bytes(limits.memory)}` +
      ` · cpu ${limits.cpu || "no limit"} · disk ${v ? bytes(v.usage.bytes) : "?"} of ` +
      `${v && v.size_limit ? bytes(v.size_limit) : "no limit"}` + (s.error ? ` · error: ${s.error}` : "");
    showState(stateOf(s));
    if (before !== stateOf(s) && page.tab === "install") loadInstallLog();
  }

  function markGone() {
    page.gone = true;
    document.getElementById("gone").hidden = false;
    showState("deleted");
    for (const b of document.querySelectorAll("#power button")) b.disabled = true;
    if (page.ws) page.ws.close();
  }

  // -- console over the node's WebSocket, opened by this page with a panel-minted token --
  const out = document.getElementById("console");
  const cpu = new Chart(document.getElementById("cpu-chart"), "#1f5fd6");
  const mem = new Chart(document.getElementById("mem-chart"), "#137333");
  let awaitingLogs = false;

  function print(text, cls) {
    const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    const span = el("span", {class: cls}, text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, ""));
    out.append(span);
    while (out.childNodes.length > 2000) out.firstChild.remove();
    if (atBottom) out.scrollTop = out.scrollHeight;
  }

  function wsStatus(text) {
    document.getElementById("ws-status").textContent = text;
  }

  function onFrame(frame) {
    switch (frame.event) {
      case "console":
        if (!awaitingLogs) print(frame.data);
        break;
      case "logs":
        awaitingLogs = false;
        out.replaceChildren();
        print(frame.data);
        break;
      case "daemon_message":
        print(`[lightd] ${frame.data}\n`, frame.data.startsWith("Error") ? "error" : "daemon");
        break;
      case "status":
        showState(frame.data);
        break;
      case "event":
        refresh();
        break;
      case "stats": {
        cpu.push(frame.cpu_usage);
        mem.push(frame.memory_usage, frame.memory_limit);
        document.getElementById("cpu-now").textContent = `${frame.cpu_usage.toFixed(1)} %`;
        document.getElementById("mem-now").textContent =
          `${bytes(frame.memory_usage)} of ${bytes(frame.memory_limit)}`;
        page.lastStats = frame;
        break;
      }
      default:
        break;
    }
  }

  async function connect() {
    if (page.gone) return;
    wsStatus("connecting…");
    let ticket;
    try {
      ticket = await api("POST", `${base}/console`);
    } catch (err) {
      if (err.status === 404) return markGone();
      wsStatus(`cannot connect: ${err.message}`);
      setTimeout(connect, 3000);
      return;
    }
    const ws = new WebSocket(ticket.url);
    page.ws = ws;
    ws.onopen = () => {
      wsStatus("connected");
      awaitingLogs = true;
      ws.send(JSON.stringify({event: "request_logs", lines: 500}));
    };
    ws.onmessage = (message) => {
      try { onFrame(JSON.parse(message.data)); } catch (err) { /* not a frame of ours */ }
    };
    ws.onclose = (event) => {
      if (page.ws !== ws) return;
      page.ws = null;
      wsStatus(`disconnected (${event.code})`);
      if (!page.gone) setTimeout(connect, event.code === 4001 ? 0 : 2000);  // 4001: token expired
    };
  }

  document.getElementById("command-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("command");
    if (!input.value || !page.ws || page.ws.readyState !== WebSocket.OPEN) return;
    page.ws.send(JSON.stringify({event: "send_command", command: input.value}));
    input.value = "";
  });

  for (const b of document.querySelectorAll("#power button[data-action]")) {
    b.addEventListener("click", async () => {
      b.disabled = true;
      await guarded(b.textContent, () => api("POST", `${base}/power`, {action: b.dataset.action}));
      await refresh();
    });
  }

  const del = document.getElementById("delete");
  del.addEventListener("click", async () => {
    if (del.dataset.armed !== "yes") {  // two clicks: no dialog to block on
      del.dataset.armed = "yes";
      del.textContent = "Click again to delete";
      setTimeout(() => { del.dataset.armed = ""; del.textContent = "Delete server"; }, 5000);
      return;
    }
    const withVolume = document.getElementById("delete-volume").checked;
    const done = await guarded("Delete", () => api("DELETE", base + (withVolume ? "?volume=delete" : "")));
    if (done) { markGone(); notice("Server deleted"); }
  });

  // -- tabs --
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.addEventListener("click", () => {
      page.tab = tab.dataset.tab;
      for (const t of document.querySelectorAll("#tabs button")) t.classList.toggle("here", t === tab);
      for (const p of document.querySelectorAll("section[data-panel]")) p.hidden = p.dataset.panel !== page.tab;
      if (page.tab === "files") loadFiles();
      if (page.tab === "backups") loadBackups();
      if (page.tab === "install") loadInstallLog();
    });
  }

  // -- a small question box (rename, new folder...) --
  function ask(question, initial) {
    const dialog = document.getElementById("ask");
    const input = document.getElementById("ask-input");
    document.getElementById("ask-question").textContent = question;
    input.value = initial || "";
    dialog.returnValue = "";
    dialog.showModal();
    input.select();
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        resolve(dialog.returnValue === "ok" && input.value ? input.value : null);
      }, {once: true});
    });
  }

  // -- files --
  const join = (name) => (page.cwd ? `${page.cwd}/${name}` : name);

  async function loadFiles() {
    const answer = await guarded("Files", () => api("GET", `${base}/files?path=${encodeURIComponent(page.cwd)}`));
    if (!answer) return;
    document.getElementById("files-path").textContent = "/" + page.cwd;
    const body = document.querySelector("#files tbody");
    body.replaceChildren();
    if (answer.files.length === 0) {
      const row = el("tr");
      row.append(el("td", {colspan: "4", class: "empty"}, "empty folder"));
      body.append(row);
    }
    for (const f of answer.files) {
      const path = join(f.name);
      const row = el("tr", {"data-name": f.name, "data-type": f.type});
      const name = el("td");
      const link = el("a", {class: "name"}, f.type === "directory" ? `${f.name}/` : f.name);
      link.addEventListener("click", () => {
        if (f.type === "directory") { page.cwd = path; loadFiles(); } else openEditor(path);
      });
      name.append(link);
      row.append(name);
      row.append(el("td", {class: "num"}, f.type === "directory" ? "" : bytes(f.size)));
      row.append(el("td", {}, when(f.modified)));
      const actions = el("td", {class: "actions"});
      if (f.type === "file") {
        actions.append(button("Download", () => download(path), "small download"));
        if (/\.(zip|tar|tar\.gz|tgz|tar\.bz2|tbz2|tar\.xz)$/i.test(f.name)) {
          actions.append(button("Unzip", () => unzip(path), "small unzip"));
        }
      }
      actions.append(button("Rename", () => rename(path), "small rename"));
      actions.append(button("Delete", () => removeFile(path, row), "small danger delete"));
      row.append(actions);
      body.append(row);
    }
  }

  async function download(path) {
    const link = await guarded("Download", () => api("POST", `${base}/files/link`, {path}));
    if (link) { page.lastLink = link.url; location.assign(link.url); }
  }

  async function unzip(path) {
    const destination = await ask(`Unpack ${path} into folder:`, page.cwd || ".");
    if (destination === null) return;
    if (await guarded("Unzip", () => api("POST", `${base}/files/unzip`, {path, destination}))) {
      notice(`Unpacked ${path}`);
      loadFiles();
    }
  }

  async function rename(path) {
    const to = await ask(`Rename ${path} to:`, path);
    if (to === null || to === path) return;
    if (await guarded("Rename", () => api("POST", `${base}/files/rename`, {from: path, to}))) loadFiles();
  }

  async function removeFile(path, row) {
    const b = row.querySelector("button.delete");
    if (b.dataset.armed !== "yes") {
      b.dataset.armed = "yes";
      b.textContent = "Sure?";
      return;
    }
    if (await guarded("Delete", () => api("POST", `${base}/files/delete`, {paths: [path]}))) loadFiles();
  }

  async function openEditor(path) {
    const answer = await guarded("Open", () => api("GET", `${base}/files/text?path=${encodeURIComponent(path)}`));
    if (!answer) return;
    document.getElementById("edit").hidden = false;
    document.getElementById("edit-path").textContent = path;
    document.getElementById("editor").value = answer.content;
    page.editing = path;
  }

  document.getElementById("edit-save").addEventListener("click", async () => {
    const content = document.getElementById("editor").value;
    if (await guarded("Save", () => api("POST", `${base}/files/text`, {path: page.editing, content}))) {
      notice(`Saved ${page.editing}`);
      loadFiles();
    }
  });
  document.getElementById("edit-close").addEventListener("click", () => {
    document.getElementById("edit").hidden = true;
  });
  document.getElementById("files-up").addEventListener("click", () => {
    page.cwd = page.cwd.split("/").slice(0, -1).join("/");
    loadFiles();
  });
  document.getElementById("files-refresh").addEventListener("click", loadFiles);
  document.getElementById("new-folder").addEventListener("click", async () => {
    const name = await ask("New folder name:", "");
    if (name && await guarded("New folder", () => api("POST", `${base}/files/folder`, {path: join(name)}))) loadFiles();
  });
  document.getElementById("new-file").addEventListener("click", async () => {
    const name = await ask("New file name:", "");
    if (name && await guarded("New file", () => api("POST", `${base}/files/text`, {path: join(name), content: ""}))) {
      await loadFiles();
      openEditor(join(name));
    }
  });

  // Uploads go from the browser straight to the node (any size, nothing through the
  // panel), each with a single-use token the panel minted for this volume.
  document.getElementById("upload-input").addEventListener("change", async (event) => {
    const files = [...event.target.files];
    for (const file of files) {
      const path = join(file.name);
      await guarded(`Upload ${file.name}`, async () => {
        const ticket = await api("POST", `${base}/files/upload`, {path});
        const response = await fetch(ticket.url, {
          method: "PUT",
          headers: {"Accept": VENDOR, "Authorization": `Bearer ${ticket.token}`, "Content-Type": "application/octet-stream"},
          body: file,
        });
        if (!response.ok) {
          let message = `${response.status}`;
          try { message = (await response.json()).error || message; } catch (err) { /* keep the status */ }
          throw new Error(message);
        }
        notice(`Uploaded ${file.name}`);
      });
    }
    event.target.value = "";
    loadFiles();
  });

  // -- backups --
  async function loadBackups() {
    const answer = await guarded("Backups", () => api("GET", `${base}/backups`));
    if (!answer) return;
    const body = document.querySelector("#backups tbody");
    body.replaceChildren();
    if (answer.backups.length === 0) {
      const row = el("tr");
      row.append(el("td", {colspan: "5", class: "empty"}, "no backup yet"));
      body.append(row);
    }
    for (const b of answer.backups) {
      const row = el("tr", {"data-backup": b.backup_id});
      row.append(el("td", {}, b.name));
      row.append(el("td", {class: "state", "data-state": b.state === "done" ? "ready" : b.state === "failed" ? "failed" : "installing"},
        b.state + (b.error ? `: ${b.error}` : "")));
      row.append(el("td", {class: "num"}, bytes(b.size)));
      row.append(el("td", {}, when(b.created_at)));
      const actions = el("td");
      if (b.state === "done") {
        actions.append(button("Restore", async () => {
          if (await guarded("Restore", () => api("POST", `${base}/backups/${b.backup_id}/restore`))) notice("Restore started");
          loadBackups();
        }, "small restore"));
        actions.append(button("Download", async () => {
          const link = await guarded("Download", () => api("POST", `${base}/backups/${b.backup_id}/link`));
          if (link) location.assign(link.url);
        }, "small download"));
      }
      if (b.state !== "running") {
        actions.append(button("Delete", async () => {
          if (await guarded("Delete backup", () => api("DELETE", `${base}/backups/${b.backup_id}`))) loadBackups();
        }, "small danger"));
      }
      row.append(actions);
      body.append(row);
    }
    document.getElementById("jobs").textContent = answer.jobs.slice(0, 3).map((j) =>
      `${j.kind} ${j.state}${j.error ? ": " + j.error : ""}` +
      (j.progress && j.progress.total ? ` (${Math.round((100 * j.progress.done) / j.progress.total)} %)` : "")).join(" · ");
    if (answer.backups.some((b) => b.state === "running") || answer.jobs.some((j) => ["queued", "running"].includes(j.state))) {
      setTimeout(() => { if (page.tab === "backups") loadBackups(); }, 1000);
    }
  }

  document.getElementById("backup-create").addEventListener("click", async () => {
    const name = document.getElementById("backup-name").value;
    if (await guarded("Backup", () => api("POST", `${base}/backups`, {name}))) {
      document.getElementById("backup-name").value = "";
      loadBackups();
    }
  });

  // -- install log --
  async function loadInstallLog() {
    const answer = await guarded("Install log", () => api("GET", `${base}/install-log`));
    if (!answer) return;
    document.getElementById("install-log").textContent =
      answer.log === null ? "(no install script ran)" : answer.log || "(empty so far)";
  }
  document.getElementById("install-refresh").addEventListener("click", loadInstallLog);

  refresh();
  setInterval(refresh, 2000);
  connect();
}

document.addEventListener("DOMContentLoaded", () => {
  const kind = document.body.dataset.page;
  if (kind === "servers") startServers();
  else if (kind === "new") startCreate();
  else if (kind === "server") serverPage();
  else startFleet();
});
