/* nanochat-atlas, layer page: sort, filter and page through every feature of one SAE.
   Data comes from features.js (window.ATLAS_LAYER); state lives in the URL hash
   (#sort=density&dir=desc&page=2&q=word) so a sorted view can be shared. */
(function () {
  "use strict";
  var data = window.ATLAS_LAYER;
  var body = document.querySelector("#ftable tbody");
  if (!data || !body) return;
  var PAGE = 100;
  var col = {};
  data.columns.forEach(function (name, i) { col[name] = i; });
  var rows = data.rows.map(function (r) {
    return { r: r, hay: (r[col.label] + " " + r[col.tokens].join(" ")).toLowerCase() };
  });
  var maxLogDensity = -Infinity, minLogDensity = Infinity;
  rows.forEach(function (x) {
    var d = x.r[col.density];
    if (d > 0) { var l = Math.log10(d); maxLogDensity = Math.max(maxLogDensity, l); minLogDensity = Math.min(minLogDensity, l); }
  });

  var state = { sort: "feature", dir: "asc", page: 1, q: "" };
  var filter = document.getElementById("filter");
  var count = document.getElementById("count");
  var pageinfo = document.getElementById("pageinfo");
  var prev = document.getElementById("prevpage");
  var next = document.getElementById("nextpage");
  var buttons = document.querySelectorAll("th button[data-sort]");

  function readHash() {
    var h = new URLSearchParams(window.location.hash.slice(1));
    if (h.get("sort") in col) state.sort = h.get("sort");
    if (h.get("dir") === "asc" || h.get("dir") === "desc") state.dir = h.get("dir");
    state.page = Math.max(1, parseInt(h.get("page"), 10) || 1);
    state.q = h.get("q") || "";
    filter.value = state.q;
  }
  function writeHash() {
    var h = new URLSearchParams({ sort: state.sort, dir: state.dir, page: String(state.page) });
    if (state.q) h.set("q", state.q);
    history.replaceState(null, "", "#" + h.toString());
  }

  function matches() {
    var q = state.q.trim().toLowerCase();
    if (!q) return rows.slice();
    var id = q.replace(/^#/, "");
    return rows.filter(function (x) {
      return String(x.r[col.feature]) === id || x.hay.indexOf(q) >= 0;
    });
  }
  function compare(a, b) {
    var i = col[state.sort], x = a.r[i], y = b.r[i];
    var c;
    if (state.sort === "label") c = String(x).localeCompare(String(y));
    else c = (x === null ? -Infinity : x) - (y === null ? -Infinity : y);
    if (c === 0) c = a.r[col.feature] - b.r[col.feature];
    return state.dir === "asc" ? c : -c;
  }

  function fmtPct(d) { return d === null ? "—" : (d * 100).toPrecision(3).replace(/\.?0+(e|$)/, "$1") + "%"; }
  function fmtNum(x) { return x === null ? "—" : String(Number(x.toPrecision(3))); }
  function cell(tr, cls, text) {
    var td = document.createElement("td");
    td.className = cls;
    if (text !== undefined) td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function render() {
    var list = matches().sort(compare);
    var pages = Math.max(1, Math.ceil(list.length / PAGE));
    state.page = Math.min(state.page, pages);
    var shown = list.slice((state.page - 1) * PAGE, state.page * PAGE);
    var frag = document.createDocumentFragment();
    shown.forEach(function (x) {
      var r = x.r, tr = document.createElement("tr");
      var a = document.createElement("a");
      a.href = "features/" + r[col.feature] + ".html";
      a.textContent = r[col.feature];
      cell(tr, "c-f").appendChild(a);
      var label = cell(tr, "c-l", r[col.label]);
      (r[col.flags] || []).forEach(function (fl) {
        var b = document.createElement("span");
        b.className = "flag flag-" + fl;
        b.textContent = fl.replace(/_/g, " ");
        label.appendChild(b);
      });
      var toks = cell(tr, "c-t");
      r[col.tokens].forEach(function (t) {
        var c = document.createElement("code");
        c.className = "tok";
        c.textContent = t;
        toks.appendChild(c);
      });
      var d = cell(tr, "c-d num");
      var density = r[col.density];
      if (density > 0 && maxLogDensity > minLogDensity) {
        var bar = document.createElement("span");
        bar.className = "dbar";
        bar.style.width = (4 + 36 * (Math.log10(density) - minLogDensity) / (maxLogDensity - minLogDensity)).toFixed(1) + "px";
        d.appendChild(bar);
      }
      d.appendChild(document.createTextNode(fmtPct(density)));
      cell(tr, "c-m num", fmtNum(r[col.max_act]));
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
    count.textContent = list.length + " of " + rows.length + " features";
    pageinfo.textContent = "page " + state.page + " / " + pages;
    prev.disabled = state.page <= 1;
    next.disabled = state.page >= pages;
    buttons.forEach(function (b) {
      if (b.getAttribute("data-sort") === state.sort) b.setAttribute("aria-sort", state.dir === "asc" ? "ascending" : "descending");
      else b.removeAttribute("aria-sort");
    });
    writeHash();
  }

  buttons.forEach(function (b) {
    b.addEventListener("click", function () {
      var key = b.getAttribute("data-sort");
      if (state.sort === key) state.dir = state.dir === "asc" ? "desc" : "asc";
      else { state.sort = key; state.dir = key === "feature" || key === "label" ? "asc" : "desc"; }
      state.page = 1;
      render();
    });
  });
  filter.addEventListener("input", function () { state.q = filter.value; state.page = 1; render(); });
  prev.addEventListener("click", function () { state.page -= 1; render(); });
  next.addEventListener("click", function () { state.page += 1; render(); });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  readHash();
  render();
})();
