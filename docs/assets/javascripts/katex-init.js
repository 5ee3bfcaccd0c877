// Math on the site, rendered by the KaTeX files served from this site (no CDN).
// Markdown pages: pymdownx.arithmatex (generic) wraps formulas in \( \) and \[ \].
// Notebook pages: their Markdown cells keep Jupyter's $ and $$.
(function () {
  var tex = [
    {left: "\\[", right: "\\]", display: true},
    {left: "\\(", right: "\\)", display: false},
  ];
  var jupyter = [
    {left: "$$", right: "$$", display: true},
    {left: "$", right: "$", display: false},
  ].concat(tex);
  function render(body) {
    body.querySelectorAll(".arithmatex").forEach(function (el) {
      renderMathInElement(el, {delimiters: tex, throwOnError: false});
    });
    body.querySelectorAll(".jupyter-wrapper .jp-MarkdownCell")
      .forEach(function (el) {
        renderMathInElement(el, {delimiters: jupyter, throwOnError: false});
      });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function (page) { render(page.body || document.body); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { render(document.body); });
  }
})();
