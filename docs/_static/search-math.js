// Sphinx builds search-result snippets from each page's HTML text, where math is still TeX source
// (MathJax renders it only on the page). Replace every math element by a plain-text reading first,
// so a snippet shows "one α_i ~ U[0,1] per sample" rather than "\(\alpha_i \sim U[0,1]\)".
(() => {
  const SYMBOLS = {
    alpha: "α", beta: "β", gamma: "γ", delta: "δ", epsilon: "ε", lambda: "λ", mu: "μ", pi: "π",
    sigma: "σ", theta: "θ", nabla: "∇", partial: "∂", sum: "Σ", infty: "∞", sim: "~", in: "∈",
    le: "≤", leq: "≤", ge: "≥", geq: "≥", ne: "≠", approx: "≈", cdot: "·", times: "×", to: "→",
    lVert: "‖", rVert: "‖", Vert: "‖", "|": "‖", dots: "…", ldots: "…", cdots: "⋯", equiv: "≡",
    sup: "sup", max: "max", min: "min", dim: "dim", pmod: "mod", ast: "*",
  };
  const BLACKBOARD = { P: "ℙ", E: "𝔼", R: "ℝ", N: "ℕ" };

  const texToText = (tex) => {
    let t = tex.replace(/^\\[(\[]/, "").replace(/\\[)\]]$/, "").replace(/\\begin\{[^}]*\}|\\end\{[^}]*\}/g, " ");
    t = t.replace(/\\mathbb\{(\w)\}/g, (m, c) => BLACKBOARD[c] || c);
    t = t.replace(/\\(?:hat|widehat)\s*\{?(\w)\}?/g, "$1\u0302").replace(/\\tilde\s*\{?(\w)\}?/g, "$1\u0303");
    t = t.replace(/\\frac\{([^{}]*)\}\{([^{}]*)\}/g, "($1)/($2)");
    t = t.replace(/\\(?:text|mathrm|mathcal|operatorname|underbrace|mathbf)\s*/g, "");
    t = t.replace(/\\(?:[Bb]ig+[lr]?|left|right)\b/g, "");
    t = t.replace(/\\(?:q?quad|[,;:! ])/g, " ");
    t = t.replace(/\\\\/g, "; ");
    t = t.replace(/\\([A-Za-z]+|\|)/g, (m, name) => (name in SYMBOLS ? SYMBOLS[name] : ""));
    return t.replace(/[{}&]/g, "").replace(/\s+/g, " ").trim();
  };

  const install = () => {
    if (typeof Search === "undefined" || Search._gradpenMath) return;
    const htmlToText = Search.htmlToText;
    Search.htmlToText = (htmlString, anchor) => {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      doc.querySelectorAll(".math").forEach((el) => {
        el.textContent = ` ${texToText(el.textContent.trim())} `;
      });
      return htmlToText(doc.documentElement.outerHTML, anchor);
    };
    Search._gradpenMath = true;
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", install);
  else install();
})();
