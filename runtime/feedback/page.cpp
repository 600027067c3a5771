// The feedback page. A person pastes their token once (kept in the browser's localStorage), then reads a
// prompt and two responses and picks the better one or a tie (buttons, or keys: A / left arrow = first,
// B / right arrow = second, T = tie, S = skip), or rates one response on the offered scale. Ids of the
// elements are what tests/feedback/browser_test.cpp drives.
#include "runtime/feedback/page.hpp"

namespace moerl::feedback {

std::string_view page_html() {
  static constexpr std::string_view kPage = R"PAGE(<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moerl feedback</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:72em;color:#222}
.row{display:flex;gap:1em}.col{flex:1;border:1px solid #bbb;border-radius:6px;padding:.8em;white-space:pre-wrap}
#prompt{background:#f4f4f4;border-radius:6px;padding:.8em;white-space:pre-wrap;margin-bottom:1em}
button{font-size:1em;margin:.3em .2em;padding:.4em .9em}#status{color:#a00;min-height:1.2em}
.hint{color:#666;font-size:.9em}
</style></head><body>
<h1>Which response is better?</h1>
<div id="login"><label>Token <input id="token" type="password" size="40"></label>
<button id="save-token">Start</button></div>
<p>Judged: <span id="count">0</span> <span class="hint">Keys: A or &larr; first, B or &rarr; second, T tie, S skip</span></p>
<div id="status"></div>
<div id="task" hidden>
<div id="prompt"></div>
<div class="row"><div class="col"><h3>First</h3><div id="first"></div>
<label>Rate <select id="rate-first"></select></label><button id="send-rate-first">Rate first</button></div>
<div class="col"><h3>Second</h3><div id="second"></div>
<label>Rate <select id="rate-second"></select></label><button id="send-rate-second">Rate second</button></div></div>
<p><button id="pick-first">First is better (A)</button><button id="pick-tie">Tie (T)</button>
<button id="pick-second">Second is better (B)</button><button id="skip">Skip (S)</button></p>
</div>
<script>
"use strict";
let token = localStorage.getItem("moerl-token") || "";
let pair = null, busy = false;
const $ = (id) => document.getElementById(id);
function say(text) { $("status").textContent = text; }
async function call(method, path, body) {
  const r = await fetch(path, {method, headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
                               body: body ? JSON.stringify(body) : undefined});
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
  return j;
}
function fillScale(scale) {
  for (const id of ["rate-first", "rate-second"]) {
    const s = $(id); if (s.options.length) continue;
    for (let v = scale[0]; v <= scale[1]; v++) { const o = document.createElement("option"); o.value = o.textContent = v; s.appendChild(o); }
  }
}
async function next() {
  try {
    const j = await call("GET", "/api/v1/next");
    $("count").textContent = j.judged;
    pair = j.pair;
    if (!pair) { $("task").hidden = true; say("Nothing to judge right now."); return; }
    fillScale(j.scale);
    $("prompt").textContent = pair.prompt; $("first").textContent = pair.first; $("second").textContent = pair.second;
    $("task").hidden = false; $("login").hidden = true; say("");
  } catch (e) { say(e.message); }
}
async function send(path, body) {
  if (!pair || busy) return;
  busy = true;
  try { const j = await call("POST", path, Object.assign({pair_id: pair.pair_id}, body)); $("count").textContent = j.judged; await next(); }
  catch (e) { say(e.message); }
  finally { busy = false; }
}
const pick = (choice) => send("/api/v1/comparisons", {choice});
$("pick-first").onclick = () => pick("first");
$("pick-second").onclick = () => pick("second");
$("pick-tie").onclick = () => pick("tie");
$("skip").onclick = () => next();
$("send-rate-first").onclick = () => send("/api/v1/ratings", {response: "first", score: Number($("rate-first").value)});
$("send-rate-second").onclick = () => send("/api/v1/ratings", {response: "second", score: Number($("rate-second").value)});
$("save-token").onclick = () => { token = $("token").value.trim(); localStorage.setItem("moerl-token", token); next(); };
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || $("task").hidden) return;
  const k = e.key.toLowerCase();
  if (k === "a" || k === "arrowleft") pick("first");
  else if (k === "b" || k === "arrowright") pick("second");
  else if (k === "t") pick("tie");
  else if (k === "s") next();
});
if (token) next();
</script></body></html>
)PAGE";
  return kPage;
}

}  // namespace moerl::feedback
