// The console page. Everything that comes from a message is set with textContent or as an attribute
// value, never parsed as markup; the server's Content-Security-Policy allows no inline script anyway.
"use strict";

let wallCards = 48; // the server's wall_cards, from its figures
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const filters = { label: $("filter-label"), status: $("filter-status"), camera: $("filter-camera") };
let source = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function colour(label) {
  let h = 0;
  for (const ch of String(label)) h = (h * 31 + ch.codePointAt(0)) % 360;
  return `hsl(${h} 65% 42%)`;
}

const pct = (x) => `${(100 * x).toFixed(1)}%`;
const metres = (x) => (x === null || x === undefined ? "" : ` @ ${Number(x).toFixed(1)} m`);

function meta(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) dl.append(el("dt", null, k), el("dd", null, v));
}

// -- pictures with their class-activation boxes ------------------------------------------------------

function picture(url, boxes, alt) {
  const wrap = el("div", "pic");
  const img = el("img");
  img.alt = alt;
  img.decoding = "async";
  const overlay = svgEl("svg", { preserveAspectRatio: "none" });
  img.addEventListener("load", () => {
    overlay.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    for (const [x0, y0, x1, y1, score] of boxes || []) {
      const rect = svgEl("rect", { class: "box", x: x0, y: y0, width: x1 - x0, height: y1 - y0 });
      rect.append(svgEl("title", {}));
      rect.firstChild.textContent = `activation ${score.toFixed(2)}`;
      overlay.append(rect);
    }
  });
  img.src = url;
  wrap.append(img, overlay);
  return wrap;
}

// -- the wall ----------------------------------------------------------------------------------------

function cardNode(c) {
  const card = el("article", `card ${c.status}`);
  card.dataset.eventId = c.event_id;
  card.style.setProperty("--c", colour(c.label));
  const verdict = el("div", "verdict");
  verdict.append(el("span", "label", c.label), el("span", "conf", pct(c.confidence)));
  const info = el("dl", "meta");
  meta(info, [["status", c.status], ["camera", c.camera_id], ["frame", c.frame_id],
              ["coil", (c.coil_id ?? "–") + metres(c.strip_offset_m)], ["latency", `${c.latency_ms} ms`]]);
  const [status, camera, frame] = info.querySelectorAll("dd");
  status.classList.add("status");
  camera.classList.add("camera");
  frame.classList.add("frame");
  card.append(picture(c.picture, c.boxes, `frame ${c.frame_id}`), verdict, info);
  card.addEventListener("click", () => openDetail(c.event_id));
  return card;
}

function addCards(cards) {
  const wall = $("wall");
  for (const c of cards) {
    if (wall.querySelector(`[data-event-id="${CSS.escape(c.event_id)}"]`)) continue;
    wall.prepend(cardNode(c));
  }
  while (wall.childElementCount > wallCards) wall.lastElementChild.remove();
  $("wall-note").textContent = wall.childElementCount ? `newest ${wall.childElementCount} shown` : "no matching events yet";
}

function connect() {
  if (source) source.close();
  const query = new URLSearchParams();
  for (const [name, select] of Object.entries(filters)) if (select.value) query.set(name, select.value);
  $("wall").replaceChildren();
  source = new EventSource(`/stream?${query}`);
  source.addEventListener("cards", (e) => addCards(JSON.parse(e.data)));
  source.addEventListener("stats", (e) => showStats(JSON.parse(e.data)));
  source.addEventListener("error", () => showLink({ state: "console-down", servers: "", detail: "reconnecting to the console…" }));
}

// -- figures -----------------------------------------------------------------------------------------

function showLink(k) {
  const link = $("link");
  link.dataset.state = k.state;
  const words = { connected: "Kafka connected", connecting: "connecting to Kafka", unreachable: "Kafka UNREACHABLE",
                  "console-down": "console unreachable" }[k.state] || k.state;
  link.textContent = [words, k.servers, k.detail, k.since ? `since ${k.since}` : ""].filter(Boolean).join(" · ");
}

function setOptions(select, names) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const name of names) {
    if (have.has(name)) continue;
    const option = el("option", null, name);
    option.value = name;
    select.append(option);
  }
}

function showStats(s) {
  showLink(s.kafka);
  wallCards = s.wall_cards;
  const dead = s.dead_letters;
  meta($("totals"), []);
  for (const [k, v] of [["events", s.events], ["uncertain", s.statuses.uncertain || 0],
                        ["unknown", s.statuses.unknown || 0], ["dead letters", dead.total],
                        ["duplicates", s.duplicates], ["invalid", Object.values(s.invalid).reduce((a, b) => a + b, 0)]]) {
    const pair = el("div");
    pair.append(el("dt", null, k), el("dd", null, v));
    $("totals").append(pair);
  }
  setOptions(filters.label, Object.keys(s.labels).sort());
  setOptions(filters.camera, Object.keys(s.cameras).sort());
  const lat = s.latency_ms;
  meta($("latency"), [["p50", lat.p50 ?? "–"], ["p95", lat.p95 ?? "–"], ["p99", lat.p99 ?? "–"], ["events", lat.n]]);
  const reasons = Object.entries(dead.by_reason).sort((a, b) => b[1] - a[1]);
  meta($("dead"), reasons.length ? reasons : [["none", ""]]);
  $("models").replaceChildren(...s.models.map((m) => el("li", m.in_service ? "" : "old",
    `${m.name} ${m.version} · ${m.events} events` + (m.in_service ? "" : ` · last seen ${m.last_seen_s_ago} s ago`))));
  drawRates(s.rates);
  showCoils(s.coils);
}

function drawRates(r) {
  const canvas = $("rates");
  const ctx = canvas.getContext("2d");
  const [w, h, pad] = [canvas.width, canvas.height, 26];
  ctx.clearRect(0, 0, w, h);
  const series = Object.entries(r.rates);
  const n = series.length ? series[0][1].length : 1;
  const top = Math.max(1, ...series.flatMap(([, v]) => v));
  ctx.strokeStyle = "#cfd8dc";
  ctx.fillStyle = "#68717a";
  ctx.font = "10px system-ui";
  ctx.strokeRect(pad, 4, w - pad - 4, h - 20);
  ctx.fillText(top.toFixed(top < 10 ? 1 : 0), 2, 12);
  ctx.fillText("0", 2, h - 16);
  ctx.fillText(`−${Math.round((n * r.bucket_s) / 60)} min`, pad, h - 4);
  ctx.fillText("now", w - 26, h - 4);
  const x = (i) => pad + ((w - pad - 4) * i) / Math.max(1, n - 1);
  const y = (v) => 4 + (h - 20) * (1 - v / top);
  for (const [label, values] of series) {
    ctx.strokeStyle = colour(label);
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
  }
  legend($("rates-legend"), series.map(([label, values]) => [label, `${label} ${values[values.length - 1]}/s`]));
}

function legend(node, items) {
  node.replaceChildren(...items.map(([label, text]) => {
    const span = el("span", null, text);
    span.style.setProperty("--c", colour(label));
    return span;
  }));
}

// -- coil map ------------------------------------------------------------------------------------------

function showCoils(coils) {
  const select = $("coil");
  setOptions(select, coils.map((c) => c.coil_id));
  if (!select.value && coils.length) select.value = coils[0].coil_id;
  if (select.value) drawCoil(select.value);
}

async function drawCoil(coilId) {
  const response = await fetch(`/api/coil?id=${encodeURIComponent(coilId)}`);
  if (!response.ok || $("coil").value !== coilId) return;
  const coil = await response.json();
  const map = $("coil-map");
  const labels = Object.keys(coil.counts).sort();
  const length = Math.max(coil.length_m, 1);
  const row = 100 / Math.max(1, labels.length);
  map.replaceChildren(svgEl("rect", { class: "strip", x: 0, y: 6, width: 440, height: 100 }));
  for (const [offset, label] of coil.points) {
    map.append(svgEl("circle", { cx: 4 + (432 * offset) / length, cy: 6 + row * (labels.indexOf(label) + 0.5),
                                 r: 3, fill: colour(label) }));
  }
  const end = svgEl("text", { x: 400, y: 118 });
  end.textContent = `${length.toFixed(0)} m`;
  const head = svgEl("text", { x: 2, y: 118 });
  head.textContent = "0 m (head)";
  map.append(head, end);
  legend($("coil-counts"), labels.map((l) => [l, `${l} ${coil.counts[l]}`]));
}

// -- detail ----------------------------------------------------------------------------------------------

function unknownScore(e) {
  if (e.ood_score == null) return []; // the model has no unknown detector
  const threshold = e.model.ood_threshold == null ? "" : ` (threshold ${e.model.ood_threshold.toFixed(2)})`;
  return [["unknown score", e.ood_score.toFixed(2) + threshold]];
}

async function openDetail(eventId) {
  const response = await fetch(`/api/event?id=${encodeURIComponent(eventId)}`);
  if (!response.ok) return;
  const e = await response.json();
  $("detail-title").textContent = `${e.label} · ${pct(e.confidence)} · ${e.status}`;
  $("detail-picture").replaceChildren(picture(e.picture, e.boxes ? e.boxes.map((b) => [b.x0, b.y0, b.x1, b.y1, b.score]) : [],
                                              `frame ${e.frame_id}`));
  $("detail-picture").firstChild.classList.add("big");
  const probs = Object.entries(e.probabilities).sort((a, b) => b[1] - a[1]);
  $("detail-probs").replaceChildren(...probs.map(([label, p]) => {
    const tr = el("tr");
    const bar = el("div", "bar");
    bar.style.setProperty("--c", colour(label));
    bar.style.width = pct(p);
    const cell = el("td");
    cell.append(bar);
    tr.append(el("td", null, label), el("td", null, pct(p)), cell);
    return tr;
  }));
  meta($("detail-meta"), [
    ["camera", e.camera_id], ["frame", e.frame_id], ["coil", (e.coil_id ?? "–") + metres(e.strip_offset_m)],
    ["model", `${e.model.name} ${e.model.version}`], ["sha256", e.model.sha256.slice(0, 16) + "…"],
    ...unknownScore(e),
    ["source", `${e.source.topic} [${e.source.partition}] @ ${e.source.offset}`], ["latency", `${e.latency_ms.toFixed(1)} ms`],
    ...Object.entries(e.times).map(([k, v]) => [k.replace("_at", ""), v]), ["event id", e.event_id],
  ]);
  $("detail").showModal();
}

for (const select of Object.values(filters)) select.addEventListener("change", connect);
$("coil").addEventListener("change", () => drawCoil($("coil").value));
connect();
