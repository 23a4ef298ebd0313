"""What a recommendation becomes on disk: the ``vllm serve`` command line, a ``vllm serve
--config`` YAML file, a JSON record, and plots."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from twin.config import ServingConfig
from twin.ml.units import BASE_UNIT
from twin.ml.recommender import served_map
from twin.ml.slo_plots import plot_cost_curve, plot_slo_frontier
from twin.outputs import json_document
from twin.results import crop_window
from twin.workload.catalog import AdapterCatalog


def engine_args(profile) -> list[str]:
    """The ``vllm serve`` flags of the engine a profile describes, beyond the serving
    config's: tensor parallelism, FP8 weights, FP8 KV cache (``twin profile``'s
    ``--tensor-parallel-size``, ``--quantization``, ``--kv-cache-dtype``). Without them
    vLLM starts one GPU with 16-bit weights and KV: not the server the twin verified."""
    hw = getattr(profile, "hardware", None) or {}
    args = []
    tp = int(hw.get("tensor_parallel_size") or 1)
    if tp > 1:
        args.append(f"--tensor-parallel-size={tp}")
    if hw.get("quantization"):
        args.append(f"--quantization={hw['quantization']}")
    if hw.get("kv_cache_dtype") not in (None, "auto"):
        args.append(f"--kv-cache-dtype={hw['kv_cache_dtype']}")
    return args


def vllm_command(config: ServingConfig, model: str, adapters=(), adapter_dir: str = "$ADAPTER_DIR",
                 catalog=None, engine: list[str] = ()) -> str:
    """``vllm serve MODEL <flags> --lora-modules name=path ...`` as one shell line.
    Adapter paths come from the catalog's ``path`` column when present, else
    ``<adapter_dir>/<name>`` (``$ADAPTER_DIR`` by default: set it before running).
    ``engine``: the profile's engine flags (:func:`engine_args`)."""
    parts = ["vllm", "serve", model] + list(engine) + config.vllm_args()
    mods = _lora_modules(adapters, adapter_dir, catalog)
    if mods:
        parts += ["--lora-modules"] + mods
    return " ".join(_quote(p) for p in parts)


def _quote(p: str) -> str:
    if "$" in p:  # keep $ADAPTER_DIR expandable
        return '"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return shlex.quote(p)


def _lora_modules(adapters, adapter_dir, catalog) -> list[str]:
    paths = {}
    if catalog is not None and "path" in catalog.table.columns:
        paths = dict(zip(catalog.table["adapter"], catalog.table["path"]))
    out = []
    for a in adapters:
        p = paths.get(a)
        if p is None or (isinstance(p, float) and np.isnan(p)):
            p = f"{adapter_dir}/{a}"
        out.append(f"{a}={p}")
    return out


def vllm_yaml(config: ServingConfig, model: str, adapters=(), adapter_dir: str = "$ADAPTER_DIR",
              catalog=None, header: str = "", engine: list[str] = ()) -> str:
    """A ``vllm serve --config`` file: the CLI's long option names as keys (``engine``:
    as :func:`vllm_command`)."""
    d = {"model": model}
    args = list(engine) + config.vllm_args()
    for a in args:
        k, _, v = a[2:].partition("=")
        if k.startswith("no-"):
            d[k[3:]] = False
        elif not v:
            d[k] = True
        else:
            d[k] = _num(v)
    mods = _lora_modules(adapters, adapter_dir, catalog)
    if mods:
        d["lora-modules"] = mods
    text = yaml.safe_dump(d, sort_keys=False, default_flow_style=False)
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    lines.append("# run: vllm serve --config vllm_config.yaml")
    if any("$ADAPTER_DIR" in m for m in mods):
        lines.append("# replace $ADAPTER_DIR with the folder of your PEFT adapters (or pass "
                     "--catalog with a path column)")
    return "\n".join(lines + [text])


def _num(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def write_config_files(out: Path, config: ServingConfig, model: str, adapters, catalog=None,
                       header: str = "", profile=None) -> list[Path]:
    """``vllm_args.txt`` and ``vllm_config.yaml`` of ``config`` on ``profile``'s engine."""
    out.mkdir(parents=True, exist_ok=True)
    engine = engine_args(profile)
    cmd = vllm_command(config, model, adapters, catalog=catalog, engine=engine)
    (out / "vllm_args.txt").write_text(cmd + "\n")
    (out / "vllm_config.yaml").write_text(vllm_yaml(config, model, adapters, catalog=catalog,
                                                    header=header, engine=engine))
    return [out / "vllm_args.txt", out / "vllm_config.yaml"]


def _jsonable(o):
    """``json_document``'s ``default``: a serving config as its dict."""
    if isinstance(o, ServingConfig):
        return o.to_dict()
    raise TypeError(type(o))


def write_json(path: Path, obj) -> Path:
    path.write_text(json_document(obj, indent=2, default=_jsonable) + "\n")
    return path


def plot_served_map(grid: pd.DataFrame, path, *, verified: pd.DataFrame | None = None,
                    chosen: tuple | None = None, title: str = ""):
    """Predicted throughput over (max_loras, served adapters), starving cells hatched, the
    starvation frontier (most adapters served without starving, per max_loras), the twin
    runs at the trace's adapter count and the recommended point."""
    import matplotlib  # lazy: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: plotting only

    xs = sorted(grid["max_loras"].unique())
    ys = sorted(grid["served"].unique())
    Z = np.full((len(ys), len(xs)), np.nan)
    S = np.zeros_like(Z, dtype=bool)
    for _, r in grid.iterrows():
        i, j = ys.index(r["served"]), xs.index(r["max_loras"])
        Z[i, j] = r["pred_throughput"]
        S[i, j] = not r["pred_ok"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 + 0.6 * len(xs)), max(4.2, 1.8 + 0.45 * len(ys))))
    im = ax.imshow(Z, origin="lower", aspect="auto", cmap="viridis")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isnan(Z[i, j]):
                continue
            if S[i, j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                           ec="white", lw=0))
            ax.text(j, i, f"{Z[i, j] / 1000:.1f}k", ha="center", va="center", fontsize=6,
                    color="white" if S[i, j] else "black")
    # frontier: per max_loras, the highest served count predicted to keep up
    fx, fy = [], []
    for j in range(len(xs)):
        okrows = [i for i in range(len(ys)) if not np.isnan(Z[i, j]) and not S[i, j]]
        if okrows:
            fx.append(j)
            fy.append(max(okrows))
    if fx:  # along the top edge of the last cell that keeps up, column by column
        px, py = [], []
        for j, i in zip(fx, fy):
            px += [j - 0.5, j + 0.5]
            py += [i + 0.5, i + 0.5]
        ax.plot(px, py, color="red", lw=2.2, label="starvation frontier (predicted)")
    if verified is not None and len(verified):
        for _, r in verified.iterrows():
            if r["max_loras"] in xs and r["served"] in ys:
                st = bool(r["starving"])
            ax.plot(xs.index(r["max_loras"]), ys.index(r["served"]) - 0.28,
                    marker="x" if st else "o", color="black" if st else "white", ms=6,
                    mec="black")
    if chosen is not None and chosen[0] in xs and chosen[1] in ys:
        ax.plot(xs.index(chosen[0]), ys.index(chosen[1]) + 0.22, marker="*", color="gold",
                ms=14, mec="black", label="recommended (verified)")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([int(x) for x in xs], fontsize=7)
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([int(y) for y in ys], fontsize=7)
    ax.set_xlabel("max_loras (GPU adapter slots)")
    ax.set_ylabel("served adapters (max_cpu_loras)")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("predicted throughput (tok/s)", fontsize=8)
    ax.plot([], [], "o", color="white", mec="black", label="twin run: keeps up")
    ax.plot([], [], "x", color="black", label="twin run: starving")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7,
              frameon=False)
    ax.set_title(title or "throughput over (max_loras, served adapters)\n"
                 "hatched: predicted to starve", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_recommendation(out: Path, rec, trace: pd.DataFrame, catalog=None, *, profile, model,
                         base: ServingConfig, model_name: str, label: str,
                         plot: bool = True) -> tuple[list, str | None]:
    """What ``twin recommend`` writes into ``out``: the vLLM config files when a
    configuration was found, ``recommendation.json``, and (``plot``) the throughput map of
    the model's predictions with the verified points. Returns the files written and the
    vLLM command line (None when no configuration was found)."""
    written, cmd = [], None
    if rec.ok:
        adapters = sorted(trace["adapter"].dropna().unique().tolist()) if catalog is None \
            else catalog.adapters
        header = (f"generated by twin recommend ({label}); verified on the twin: "
                  f"{rec.verified['throughput']:.0f} tok/s, "
                  f"{100 * rec.verified['achieved']:.1f}% of offered, profile {profile.name}")
        written += write_config_files(out, rec.config, model_name, adapters, catalog=catalog,
                                      header=header, profile=profile)
        cmd = (out / "vllm_args.txt").read_text().strip()
    written.append(write_json(out / "recommendation.json", rec.to_dict()))
    if plot:
        cat = catalog or AdapterCatalog.uniform(
            sorted(trace["adapter"].dropna().unique().tolist()), base.max_lora_rank)
        tr = crop_window(trace, rec.window_s)
        grid = served_map(model, tr, cat, profile=profile, base=base, window_s=rec.window_s)
        ver = rec.candidates.dropna(subset=["ver_throughput"])
        ver = ver.assign(served=int(rec.workload["n_adapters"]), starving=ver["ver_starving"])
        chosen = ((rec.config.max_loras, int(rec.workload["n_adapters"])) if rec.ok else None)
        written.append(plot_served_map(grid, out / "throughput_map.png", verified=ver,
                                       chosen=chosen))
        if rec.search is not None:
            written.append(plot_slo_frontier(rec.search, rec.slo, out / "slo_frontier.png",
                                             chosen=rec.config))
    return written, cmd


def write_cost(out: Path, plan, catalog=None, *, profile, model_name: str,
               label: str, plot: bool = True) -> list:
    """What ``twin recommend --objective cost`` writes into ``out``: the placement's files
    (:func:`write_placement`), ``cost.json`` (GPUs, price, cost curve) and, with ``plot``,
    ``cost_curve.png``."""
    write_placement(out, plan.placement, catalog, profile=profile,
                    model_name=model_name, label=label)
    written = [out / "routing.csv", out / "placement.json",
               write_json(out / "cost.json", {**plan.to_dict(), "trace": label,
                                              "one_gpu": plan.one_gpu.to_dict()})]
    if plot and plan.placement.curve:
        written.append(plot_cost_curve(plan.placement.curve, plan.slo, out / "cost_curve.png",
                                       chosen=plan.gpus))
    return written


def write_placement(out: Path, pl, catalog=None, *, profile, model_name: str,
                    label: str, fleet_check: dict | None = None) -> None:
    """What ``twin place`` writes into ``out``: one folder of vLLM config files per GPU
    whose configuration was found, ``routing.csv`` and ``placement.json`` (with
    ``fleet_check``, ``twin.fleet.verify``'s, when given)."""
    record = {"ok": pl.ok, "gpus": [], "attempts": pl.attempts, "verify_runs": pl.verify_runs,
              "total_s": pl.total_s, "profile": profile.name}
    record["replicas"] = {a: r for a, r in pl.replicas.items() if r > 1}
    record["split_why"] = dict(pl.split_why)
    for g in pl.gpus:
        r = g.recommendation
        ads = g.adapters
        entry = {"gpu": g.gpu, "adapters": ads, "base_model_traffic": BASE_UNIT in g.units,
                 "ok": bool(r.ok) if r else None,
                 "config": r.config.to_dict() if (r and r.ok) else None,
                 "verified": r.verified if r else None,
                 "predicted": r.predicted if r else None}
        record["gpus"].append(entry)
        if r is not None and r.ok:
            write_config_files(out / f"gpu-{g.gpu}", r.config, model_name, ads, catalog=catalog,
                               header=f"twin place ({label}): GPU {g.gpu} of {len(pl.gpus)}",
                               profile=profile)
    if fleet_check is not None:
        record["fleet_check"] = fleet_check
    pl.routing.to_csv(out / "routing.csv", index=False)
    write_json(out / "placement.json", record)
