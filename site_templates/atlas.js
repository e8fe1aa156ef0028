/* nanochat-atlas, every page: keyboard navigation and the token hover tooltip.
   Text from the corpus only ever reaches the DOM through textContent. */
(function () {
  "use strict";

  function typing(el) {
    return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable);
  }

  // "/" focuses search; on feature pages ← / → (or k / j) go to the previous / next feature.
  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey || typing(e.target)) return;
    if (e.key === "/") {
      var box = document.querySelector("input[type=search]");
      if (box) { e.preventDefault(); box.focus(); box.select(); }
      return;
    }
    var rel = { ArrowLeft: "prev", k: "prev", ArrowRight: "next", j: "next" }[e.key];
    var link = rel && document.querySelector('a[rel="' + rel + '"]');
    if (link) { e.preventDefault(); window.location.href = link.href; }
  });

  // Hovering a token shows its text and activation (data-v; absent means 0).
  var tip = null;
  function showTip(span) {
    if (!tip) {
      tip = document.createElement("div");
      tip.className = "tip";
      tip.setAttribute("role", "tooltip");
      document.body.appendChild(tip);
    }
    var v = span.getAttribute("data-v");
    var act = v === null ? 0 : parseFloat(v);
    var box = span.closest(".exs");
    var max = box ? parseFloat(box.getAttribute("data-max")) : NaN;
    var t = document.createElement("span");
    t.className = "tt";
    t.textContent = span.textContent;
    var val = document.createElement("span");
    val.className = "tv";
    val.textContent = "activation " + (v === null ? "0" : v) +
      (max > 0 && act !== 0 ? "  (" + Math.round(100 * act / max) + "% of max)" : "") +
      (span.classList.contains("c") ? "  · the example’s token" : "");
    tip.replaceChildren(t, val);
    var r = span.getBoundingClientRect();
    tip.style.display = "block";
    var left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
    tip.style.left = Math.max(4, left) + "px";
    tip.style.top = (window.scrollY + r.bottom + 6) + "px";
  }
  document.addEventListener("mouseover", function (e) {
    var span = e.target.closest && e.target.closest(".ctx span");
    if (span) showTip(span);
    else if (tip) tip.style.display = "none";
  });
})();
