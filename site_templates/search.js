/* nanochat-atlas, search page: loads the index shards listed by manifest.js (script tags,
   so it works from file:// too), then matches every query term against feature ids, labels
   and top tokens. A record is [layer_index, feature, label, tokens, density]. */
(function () {
  "use strict";
  var manifest = window.ATLAS_SEARCH;
  var input = document.getElementById("q");
  var layerSelect = document.getElementById("layer");
  var status = document.getElementById("status");
  var results = document.getElementById("results");
  var LIMIT = 200;
  var records = [];
  var ready = false;

  function loadShards(done) {
    var left = manifest.shards.length;
    if (left === 0) { done(); return; }
    window.atlasSearchShard = function (rows) {
      rows.forEach(function (r) {
        records.push({
          layer: manifest.layers[r[0]][0], title: manifest.layers[r[0]][1], f: r[1], label: r[2], tokens: r[3],
          density: r[4], labelLow: r[2].toLowerCase(), tokLow: r[3].join(" ").toLowerCase()
        });
      });
    };
    manifest.shards.forEach(function (name) {
      var s = document.createElement("script");
      s.src = name;
      s.onload = function () { left -= 1; if (left === 0) done(); };
      s.onerror = function () { status.textContent = "Could not load the search index shard " + name + "."; };
      document.head.appendChild(s);
    });
  }

  // An id term ("123", "#123", "L4/123", "4/123") must match exactly; any other term must be a
  // substring of the label or a top token. Label hits at a word start rank above the rest.
  function score(rec, terms) {
    var total = 0;
    for (var i = 0; i < terms.length; i++) {
      var t = terms[i];
      var id = t.replace(/^#/, "");
      if (id === String(rec.f) || t === "l" + rec.layer.toLowerCase() + "/" + rec.f || t === rec.layer.toLowerCase() + "/" + rec.f) {
        total += 100;
        continue;
      }
      var at = rec.labelLow.indexOf(t);
      if (at === 0 || (at > 0 && !/[a-z0-9]/.test(rec.labelLow.charAt(at - 1)))) total += 4;
      else if (at > 0) total += 2;
      else if (rec.tokLow.indexOf(t) >= 0) total += 3;
      else return -1;
    }
    return total;
  }

  function run() {
    if (!ready) return;
    var q = input.value.trim().toLowerCase();
    var layer = layerSelect.value;
    results.replaceChildren();
    if (!q) { status.textContent = records.length + " features indexed. Type to search."; return; }
    var terms = q.split(/\s+/);
    var hits = [];
    records.forEach(function (rec) {
      if (layer && rec.layer !== layer) return;
      var s = score(rec, terms);
      if (s >= 0) hits.push([s, rec]);
    });
    hits.sort(function (a, b) { return b[0] - a[0] || b[1].density - a[1].density || a[1].f - b[1].f; });
    status.textContent = hits.length + " match" + (hits.length === 1 ? "" : "es") + (hits.length > LIMIT ? ", showing the first " + LIMIT : "");
    var frag = document.createDocumentFragment();
    hits.slice(0, LIMIT).forEach(function (h) {
      var rec = h[1], li = document.createElement("li");
      var a = document.createElement("a");
      a.href = "../layers/" + encodeURIComponent(rec.layer) + "/features/" + rec.f + ".html";
      a.textContent = rec.title + " #" + rec.f;
      var label = document.createElement("span");
      label.className = "rl";
      label.textContent = rec.label || "(no label)";
      var dens = document.createElement("span");
      dens.className = "num muted";
      dens.textContent = (rec.density * 100).toPrecision(3) + "%";
      var toks = document.createElement("span");
      toks.className = "rt";
      rec.tokens.forEach(function (t) {
        var c = document.createElement("code");
        c.className = "tok";
        c.textContent = t;
        toks.appendChild(c);
      });
      li.append(a, label, dens, toks);
      frag.appendChild(li);
    });
    results.appendChild(frag);
  }

  function syncUrl() {
    var params = new URLSearchParams();
    if (input.value) params.set("q", input.value);
    if (layerSelect.value) params.set("layer", layerSelect.value);
    try { history.replaceState(null, "", "?" + params.toString()); } catch (e) { /* some file:// setups */ }
  }

  var params = new URLSearchParams(window.location.search);
  input.value = params.get("q") || "";
  if (params.get("layer")) layerSelect.value = params.get("layer");
  document.getElementById("searchform").addEventListener("submit", function (e) { e.preventDefault(); syncUrl(); run(); });
  input.addEventListener("input", function () { syncUrl(); run(); });
  layerSelect.addEventListener("change", function () { syncUrl(); run(); });
  if (!manifest) { status.textContent = "The search index (manifest.js) is missing."; return; }
  loadShards(function () { ready = true; run(); });
})();
