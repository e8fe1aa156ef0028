"""
Assemble README.md from docs/_readme_head.md, the per-area docs/*.md (in `order`) and
docs/_readme_tail.md, and BENCHMARKS.md from bench/RESULTS_*.md. Edit those, then run
`python docs/assemble.py`; each area doc's top heading becomes a `##` section.
"""
import re
from pathlib import Path
root = Path(__file__).resolve().parents[1]
order = ["demo", "sae_training", "sae", "store", "site", "neuronpedia", "distributed", "runtime", "formats"]
parts = [(root / "docs" / "_readme_head.md").read_text()]
for name in order:
    p = root / "docs" / f"{name}.md"
    if not p.exists():
        continue
    text = p.read_text().strip() + "\n"
    lines = text.splitlines()
    heads, fence = [], False
    for l in lines:
        if l.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^(#+) ", l)):
            heads.append(len(m.group(1)))
    top = min(heads)
    shift = 2 - top  # the doc's top heading becomes '##'
    out, fence = [], False
    for l in lines:
        if l.startswith("```"):
            fence = not fence
        m = re.match(r"^(#+) ", l)
        if m and not fence:
            l = "#" * (len(m.group(1)) + shift) + l[len(m.group(1)):]
        out.append(l)
    body = "\n".join(out)
    body = body.replace("`docs/sae_training.md`", "the section above").replace("docs/store.md", "README.md")
    parts.append(body + "\n")
parts.append((root / "docs" / "_readme_tail.md").read_text())
(root / "README.md").write_text("\n".join(parts))

bench = ["# Benchmarks\n",
         "Every benchmark prints ratios measured side by side in one run (`python -m bench.bench_X`).",
         "Machine for all rows below unless a row says otherwise: the 2-core CPU sandbox (x86-64, 24 GiB,",
         "no GPU), shared with other jobs while these were taken (load average 4-14), so absolute numbers",
         "are low and noisy; the ratios are what to read. Rows measured on the lent GPU machine (one",
         "H200, 16 CPU cores) say so.\n"]
for p in sorted((root / "bench").glob("RESULTS_*.md")):
    text = p.read_text().strip()
    text = re.sub(r"^# ", "## ", text, flags=re.M) if not text.startswith("## ") else text
    bench.append(text + "\n")
(root / "BENCHMARKS.md").write_text("\n".join(bench))
print("ok")
