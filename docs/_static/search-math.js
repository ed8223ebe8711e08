// Sphinx builds search-result snippets from each page's HTML text, where math is still TeX source
// (MathJax renders it only on the page). Replace every math element by a plain-text reading first,
// so a snippet shows "one α_i ~ U[0,1] per sample" rather than "\(\alpha_i \sim U[0,1]\)".
// tests/test_docs_search.py runs texToText (under node) on every formula of the docs.
const gradpenTexToText = (() => {
  const SYMBOLS = {
    alpha: "α", beta: "β", gamma: "γ", delta: "δ", epsilon: "ε", varepsilon: "ε", lambda: "λ",
    mu: "μ", pi: "π", rho: "ρ", sigma: "σ", tau: "τ", theta: "θ", phi: "φ", varphi: "φ", psi: "ψ",
    omega: "ω", Gamma: "Γ", Delta: "Δ", Sigma: "Σ", Omega: "Ω", nabla: "∇", partial: "∂", sum: " Σ",
    prod: " Π", infty: "∞", sim: "~", in: "∈", le: "≤", leq: "≤", ge: "≥", geq: "≥", ne: "≠",
    neq: "≠", approx: "≈", cdot: "·", times: "×", pm: "±", to: "→", mapsto: "↦", lVert: "‖",
    rVert: "‖", Vert: "‖", lvert: "|", rvert: "|", vert: "|", dots: "…", ldots: "…", cdots: "⋯",
    equiv: "≡", ast: "*", top: "ᵀ", langle: "⟨", rangle: "⟩", pmod: "mod",
  };
  // Layout commands that carry no text of their own.
  const DROP = new Set([
    "textstyle", "displaystyle", "scriptstyle", "left", "right", "big", "Big", "bigg", "Bigg",
    "bigl", "bigr", "Bigl", "Bigr", "biggl", "biggr", "nonumber", "notag", "limits",
  ]);
  // Commands whose argument is shown as it is.
  const WRAP = "text|textrm|texttt|textbf|textit|mathrm|mathit|mathbf|mathsf|mathtt|mathcal|" +
    "operatorname|boldsymbol|underbrace|overbrace";
  const BLACKBOARD = { P: "ℙ", E: "𝔼", R: "ℝ", N: "ℕ", Z: "ℤ" };
  const SUPERSCRIPT = { 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };
  const ARG = String.raw`(\{[^{}]*\}|\\[A-Za-z]+|[^\s{}\\])`; // {group}, \command or one character
  const unbrace = (a) => (a.startsWith("{") ? a.slice(1, -1) : a);
  const simple = (a) => /^\\?\w+$/.test(a);

  return (tex) => {
    let t = tex.trim().replace(/^\\[(\[]/, "").replace(/\\[)\]]$/, "");
    t = t.replace(/\\(?:begin|end)\{[^}]*\}/g, " ");
    t = t.replace(/\\mathbb\s*\{?(\w)\}?/g, (m, c) => BLACKBOARD[c] || c);
    t = t.replace(/\\(?:hat|widehat)\s*(?:\{(\w)\}|(\w))/g, (m, a, b) => `${a || b}\u0302`);
    t = t.replace(/\\(?:tilde|widetilde)\s*(?:\{(\w)\}|(\w))/g, (m, a, b) => `${a || b}\u0303`);
    t = t.replace(/\\bar\s*(?:\{(\w)\}|(\w))/g, (m, a, b) => `${a || b}\u0304`);
    for (let i = 0; i < 4; i++) {  // innermost groups first, so nested fractions and roots resolve
      t = t.replace(new RegExp(String.raw`\\[td]?frac\s*` + ARG + String.raw`\s*` + ARG, "g"), (m, a, b) => {
        const [p, q] = [unbrace(a), unbrace(b)];
        return `${simple(p) ? p : `(${p})`}/${simple(q) ? q : `(${q})`}`;
      });
      t = t.replace(new RegExp(String.raw`\\sqrt\s*` + ARG, "g"), (m, a) => (simple(unbrace(a)) ? `√${unbrace(a)}` : `√(${unbrace(a)})`));
      t = t.replace(new RegExp(String.raw`\\(?:${WRAP})\s*\{([^{}]*)\}`, "g"), "$1");
    }
    t = t.replace(new RegExp(String.raw`\\(?:${WRAP})(?![A-Za-z])\s*`, "g"), "");
    t = t.replace(/\\\\/g, "; ").replace(/\\(?:q?quad|[,;:! ])/g, " ").replace(/\\\|/g, "‖");
    t = t.replace(/\^(?:\{([0-9])\}|([0-9]))(?![0-9])/g, (m, a, b) => SUPERSCRIPT[a || b]);
    t = t.replace(/\\([A-Za-z]+)/g, (m, name) => (name in SYMBOLS ? SYMBOLS[name] : DROP.has(name) ? "" : name));
    t = t.replace(/\^\{([^{}]*)\}/g, "^($1)").replace(/_\{([^{}]*)\}/g, "_($1)");
    return t.replace(/[{}&]/g, "").replace(/\s+/g, " ").trim();
  };
})();

if (typeof module !== "undefined") {
  module.exports = { texToText: gradpenTexToText };  // for the test, under node
} else {
  const install = () => {
    if (typeof Search === "undefined" || Search._gradpenMath) return;
    const htmlToText = Search.htmlToText;
    Search.htmlToText = (htmlString, anchor) => {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      doc.querySelectorAll(".math").forEach((el) => {
        el.textContent = ` ${gradpenTexToText(el.textContent)} `;
      });
      return htmlToText(doc.documentElement.outerHTML, anchor);
    };
    Search._gradpenMath = true;
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", install);
  else install();
}
