"""
`build_atlas` end to end: model → SAEs → feature store → site → Neuronpedia export.

    build_atlas(AtlasConfig(layers=[4, 10, 16]))

Stages and where they write (every stage is atomic and resumable on its own):
    model   nanochat.model_source.resolve_model (explicit, $NANOCHAT_BASE_DIR, else the demo,
            which is built once and cached)
    train   <work>/saes/blocks.<L>.hook_<kind>/   SAELens folders + eval.json
    mine    <work>/features.duckdb                 the feature store (SQL)
    render  <out>/                                 the static site (index.html, layers/, search/)
    export  <work>/neuronpedia/                    Neuronpedia bulk layout + API payloads
The site lives alone in <out> so the folder can be pushed to GitHub Pages as it is; the
heavier build products sit in <work> (default: <out>_work, beside it).

Caching: <work>/stages.json records a fingerprint of each finished stage's inputs. A rerun
skips a stage whose fingerprint is unchanged and whose outputs exist; an interrupted stage
resumes (SAE training from its last checkpoint, mining from its last committed chunk).
`force` rebuilds everything after the model.

Threads: on a CPU (without OMP_NUM_THREADS), the train and mine stages each start by timing a
few small matmuls on all cores and on one (nanochat.common.pick_threads): on a machine busy with
other work, 2 intra-op threads ran 3-5x slower than 1 here, on an idle one 1.7x faster.

Under torchrun (`torchrun --nproc_per_node=N -m scripts.build_atlas ...`) every rank trains
(data-parallel) and mines (its share of the held-out text); rank 0 alone decides which
stages are current, prints, writes stages.json, renders and exports, while the other ranks
wait. Ranks on several nodes need <out> and <work> on a shared file system: every rank loads
the SAEs rank 0 wrote before mining.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nanochat.common import auto_threads
from nanochat.dataset import list_corpus_files
from nanochat.distributed import DistContext, agree, barrier, broadcast_object, init_distributed

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "site_templates"


@dataclass
class AtlasConfig:
    layers: list[int] | None = None        # None: n/4, n/2, 3n/4
    out: str = "atlas_out"                 # the static site
    work: str | None = None                # SAEs, store, exports; None: <out>_work
    checkpoint: str | None = None
    data: str | None = None
    hook: str = "resid_post"
    arch: str = "batchtopk"
    width: int | None = None               # None: expansion x d_model
    expansion: float = 8.0
    k: int = 32
    train_tokens: int | None = None        # None: 500k on CPU, 50M on GPU
    mine_tokens: int | None = None         # None: 250k on CPU, 10M on GPU
    device: str | None = None
    model_id: str | None = None            # Neuronpedia model id override
    source_set: str | None = None          # Neuronpedia source-set name override
    force: bool = False
    quiet: bool = False

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(f"{Path(self.out)}_work")


def build_atlas(cfg: AtlasConfig, ctx: DistContext | None = None) -> dict:
    """Run every stage; returns a summary (on every rank; only rank 0's lists what it wrote).
    `ctx`: the torchrun context (default: joined here from torchrun's environment, if any)."""
    from atlas.mine import MineConfig, mine_features
    from nanochat.model_source import resolve_corpus, resolve_model
    from sae.train_run import RunConfig, run_training

    t_start = time.time()
    ctx = ctx or init_distributed(cfg.device)
    main = ctx.is_main
    quiet = cfg.quiet or not main
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    out, work = Path(cfg.out), cfg.work_dir
    if out.resolve() == work.resolve() or work.resolve() in out.resolve().parents:
        raise ValueError(f"--work {work} must not be --out {out} or inside it")
    if main:
        work.mkdir(parents=True, exist_ok=True)
    stages = _Stages(work / "stages.json", force=cfg.force)
    device = ctx.device
    on_gpu = device.type == "cuda"
    timings: dict[str, float] = {}

    # -- model and text (rank 0 first: it builds the demo model if there is none yet)
    t0 = time.time()
    say("== model" + (f" ({ctx.world} ranks)" if ctx.enabled else ""))
    error = None
    if main:
        try:
            source = resolve_model(cfg.checkpoint, device, quiet=quiet)
        except Exception as e:
            error = e
    agree(ctx, error)
    if not main:
        source = resolve_model(cfg.checkpoint, device, quiet=True)
    corpus = resolve_corpus(source, cfg.data)
    say(f"   {source.describe()}")
    say(f"   text: {corpus} (train split for SAEs, held-out split for mining)")
    timings["model"] = time.time() - t0
    model_fp = {"checkpoint": str(source.checkpoint_dir), "step": source.step,
                "model_file": _file_stamp(source.checkpoint_dir / f"model_{source.step:06d}.pt")}
    corpus_fp = [_file_stamp(f) for f in list_corpus_files(corpus)]

    # -- SAEs
    t0 = time.time()
    train_tokens = cfg.train_tokens or (50_000_000 if on_gpu else 500_000)
    run_cfg = RunConfig(layers=cfg.layers, hook=cfg.hook, architecture=cfg.arch, width=cfg.width,
                        expansion=cfg.expansion, k=cfg.k, tokens=train_tokens,
                        checkpoint=str(source.checkpoint_dir), data=str(corpus),
                        out=str(work / "saes"), device=str(device), quiet=quiet)
    train_fp = _digest(model_fp, corpus_fp, {k: v for k, v in asdict(run_cfg).items()
                                             if k not in ("quiet", "resume", "out", "device")})
    # rank 0 decides (and clears stale outputs); every rank follows its decision
    decision = None
    if main:
        sae_dirs = stages.outputs("train", train_fp)
        if sae_dirs and all((Path(p) / "cfg.json").exists() for p in sae_dirs):
            decision = {"skip": True, "sae_dirs": sae_dirs}
        else:
            saes_dir = work / "saes"
            if cfg.force or stages.fingerprint("train") not in (None, train_fp):
                shutil.rmtree(saes_dir, ignore_errors=True)  # different inputs: start over
            decision = {"skip": False, "resume": saes_dir.exists()}
    decision = broadcast_object(ctx, decision)
    if decision["skip"]:
        sae_dirs = decision["sae_dirs"]
        say(f"== train: up to date ({len(sae_dirs)} SAEs in {work / 'saes'})")
    else:
        threads = auto_threads(device)  # per stage: the machine's load may have changed
        say(f"== train: {cfg.arch} SAEs on {train_tokens:,} tokens each{_threads_note(threads)}")
        run_cfg.resume = decision["resume"]
        result = run_training(run_cfg, source=source, log=say, ctx=ctx)
        sae_dirs = [str(p) for p in result.sae_dirs.values()]
        if main:
            stages.finish("train", train_fp, sae_dirs)
        barrier(ctx)  # every SAE folder is written before any rank loads them to mine
    timings["train"] = time.time() - t0

    # -- mine
    t0 = time.time()
    store_path = work / "features.duckdb"
    mine_tokens = cfg.mine_tokens or (10_000_000 if on_gpu else 250_000)
    threads = auto_threads(device)
    say(f"== mine: up to {mine_tokens:,} held-out tokens through {len(sae_dirs)} SAEs"
        f"{_threads_note(threads)}")
    mined = mine_features([Path(p) for p in sae_dirs], source, corpus, store_path,
                          MineConfig(tokens=mine_tokens, force=cfg.force), quiet=quiet, ctx=ctx)
    timings["mine"] = time.time() - t0
    if not main:  # rank 0 alone renders and exports; the others wait for its outcome
        agree(ctx, None)
        return {"rank": ctx.rank, "model": source.describe(), "sae_dirs": sae_dirs,
                "seconds": time.time() - t_start, "stage_seconds": timings}
    try:
        summary = _render_and_export(cfg, say, quiet, stages, source, corpus, sae_dirs, store_path,
                                     mined, timings, t_start)
    except Exception as e:
        agree(ctx, e)  # single process: re-raises e; torchrun: every rank raises RankFailure
        raise
    agree(ctx, None)
    return summary


def _render_and_export(cfg: AtlasConfig, say, quiet: bool, stages: "_Stages", source, corpus,
                       sae_dirs: list[str], store_path: Path, mined: dict, timings: dict,
                       t_start: float) -> dict:
    from atlas.neuronpedia import export_neuronpedia
    from atlas.render import render_site
    out, work = Path(cfg.out), cfg.work_dir

    # -- render
    t0 = time.time()
    notes_dir = work / "notes"
    render_fp = _digest(mined["fingerprint"], _tree_digest(notes_dir), _tree_digest(TEMPLATES_DIR))
    if stages.outputs("render", render_fp) and (out / "index.html").exists():
        say(f"== render: up to date ({out})")
        rendered = None
    else:
        say(f"== render: {out}")
        rendered = render_site(store_path, out, notes_dir=notes_dir, quiet=quiet)
        stages.finish("render", render_fp, [str(out)])
    timings["render"] = time.time() - t0

    # -- export
    t0 = time.time()
    np_dir = work / "neuronpedia"
    export_fp = _digest(mined["fingerprint"], cfg.model_id, cfg.source_set)
    if stages.outputs("export", export_fp) and np_dir.exists():
        say(f"== export: up to date ({np_dir})")
    else:
        say(f"== export: Neuronpedia layout -> {np_dir}")
        export_neuronpedia(store_path, np_dir, model_id=cfg.model_id, source_set=cfg.source_set,
                           quiet=quiet)
        stages.finish("export", export_fp, [str(np_dir)])
    timings["export"] = time.time() - t0

    summary = {
        "model": source.describe(), "corpus": str(corpus), "sae_dirs": sae_dirs,
        "store": str(store_path), "site": str(out), "neuronpedia": str(np_dir),
        "notes": str(notes_dir), "seconds": time.time() - t_start, "stage_seconds": timings,
        "rendered": rendered,
    }
    if not cfg.quiet:
        _print_summary(summary)
    return summary


def _threads_note(threads: int | None) -> str:
    return "" if threads is None else f" ({threads} CPU thread{'s' if threads > 1 else ''})"


def _print_summary(s: dict) -> None:
    site = Path(s["site"]).resolve()
    print()
    print(f"atlas built in {s['seconds']:.0f}s "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in s['stage_seconds'].items())})")
    print(f"  model        {s['model']}")
    print(f"  SAEs         {', '.join(s['sae_dirs'])}")
    print(f"  store (SQL)  {s['store']}    e.g. duckdb {s['store']} \"SELECT * FROM saes\"")
    print(f"  site         {site}/index.html")
    print(f"  neuronpedia  {s['neuronpedia']}  (python -m scripts.neuronpedia_validate "
          f"{s['neuronpedia']})")
    print(f"  notes        add markdown as {s['notes']}/<layer>/<feature>.md, then rerun")
    print("view it:  open the index.html above in a browser (works from disk), or")
    print(f"          python -m http.server -d {s['site']} 8000  ->  http://localhost:8000/")


class _Stages:
    """stages.json: {stage: {"fingerprint": str, "outputs": [paths], "finished": unix time}}."""

    def __init__(self, path: Path, force: bool):
        self.path = path
        self.data = {}
        if path.exists() and not force:
            try:
                self.data = json.loads(path.read_text())
            except json.JSONDecodeError:
                self.data = {}  # a damaged record only costs a rebuild

    def fingerprint(self, stage: str) -> str | None:
        return self.data.get(stage, {}).get("fingerprint")

    def outputs(self, stage: str, fingerprint: str) -> list[str] | None:
        rec = self.data.get(stage)
        if rec and rec.get("fingerprint") == fingerprint:
            if all(Path(p).exists() for p in rec["outputs"]):
                return rec["outputs"]
        return None

    def finish(self, stage: str, fingerprint: str, outputs: list[str]) -> None:
        self.data[stage] = {"fingerprint": fingerprint, "outputs": outputs, "finished": time.time()}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_stamp(path: Path) -> list:
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _tree_digest(root: Path) -> str | None:
    if not root.exists():
        return None
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
