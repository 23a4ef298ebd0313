"""Adversarial new-user probe of every `twin` command (issue 11, bar 7: no traceback from any
command on bad input).

Runs ~150 bad or edge inputs through the real CLI (one subprocess each, as a user would) and
classifies every outcome:

  ok        exit 0 (and the result passed the case's sanity check, if it has one)
  input     exit 2 with one line on stderr: the project's input error
  internal  exit 70: the twin's own bug line
  traceback a Python traceback, or any other exit status
  hang      still running after the timeout
  wrong     exit 0 but the result is silently wrong or misleading (the case's check says why)

It prints a table (case, class, exit, first line of stderr / the check's complaint) and, as the
last line, a JSON object of counts per class. Cheap by construction: short traces, the tiny
executor model, --window-s.

  PYTHONPATH=. python experiments/probe_inputs.py [--only SUBSTR] [--jobs 2] [--timeout 120]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "traces" / "rate_classes_32_heavy_10min.parquet"


# ---------------------------------------------------------------- input files

def build_files(d: Path) -> dict[str, str]:
    """Write every mangled or edge input once; return name -> path."""
    f: dict[str, str] = {}
    full = pd.read_parquet(SHIPPED)
    base = full.head(40).copy()[["request_id", "arrival_s", "adapter", "prompt_tokens",
                                  "output_tokens"]]
    base["prompt_tokens"] = base["prompt_tokens"].clip(upper=64)
    base["output_tokens"] = base["output_tokens"].clip(upper=16)
    base = base.astype({"prompt_tokens": "int64", "output_tokens": "int64"})

    def put(name, df, fmt="csv"):
        p = d / f"{name}.{fmt}"
        if fmt == "csv":
            df.to_csv(p, index=False)
        else:
            df.to_parquet(p, index=False)
        f[name] = str(p)

    def text(name, s, ext="csv"):
        p = d / f"{name}.{ext}"
        p.write_text(s, encoding="utf-8")
        f[name] = str(p)

    put("small", base)
    put("small_pq", base, "parquet")
    put("one", base.head(1))
    b = base.copy(); b["adapter"] = pd.NA; put("all_base", b)
    b = base.copy(); b["adapter"] = "lora-1"; put("all_one", b)
    b = base.copy(); b["arrival_s"] = 0.0; put("all_t0", b)
    b = base.copy(); b["arrival_s"] = b["arrival_s"] + 1e9; put("huge_t", b)
    b = base.copy(); b["arrival_s"] = b["arrival_s"] + 100.0; put("late_start", b)
    b = base.copy(); b["adapter"] = [str(i % 5) for i in range(len(b))]; put("numeric_names", b)
    b = base.copy(); b["adapter"] = [["ü-lora", "日本", "a b", "x,y", "NA"][i % 5]
                                     for i in range(len(b))]
    put("unicode_names", b)
    b = base.copy(); b.loc[3, "prompt_tokens"] = -5; put("neg_prompt", b)
    b = base.copy(); b.loc[3, "output_tokens"] = 0; put("zero_output", b)
    b = base.copy(); b["prompt_tokens"] = b["prompt_tokens"].astype(float); b.loc[2, "prompt_tokens"] = 3.5
    put("frac_prompt", b)
    b = base.copy(); b["arrival_s"] = b["arrival_s"].astype(object); b.loc[2, "arrival_s"] = "abc"
    put("text_arrival", b)
    b = base.copy(); b.loc[5, "arrival_s"] = float("nan"); put("nan_arrival", b)
    b = base.copy(); b.loc[5, "arrival_s"] = float("inf"); put("inf_arrival", b)
    b = base.copy(); b.loc[5, "arrival_s"] = -1.0; put("neg_arrival", b)
    b = base.copy(); b["request_id"] = 7; put("dup_ids", b)
    b = base.sample(frac=1.0, random_state=0); put("unsorted", b)
    put("no_adapter_col", base.drop(columns=["adapter"]))
    put("no_arrival_col", base.drop(columns=["arrival_s"]))
    b = base.copy(); b["extra"] = "x"; put("extra_col", b)
    b = base.copy(); b.loc[4, "prompt_tokens"] = 10 ** 12; put("huge_prompt", b)
    b = base.copy(); b["prompt_tokens"] = 200000; put("all_too_long", b)
    text("empty_file", "")
    text("header_only", "request_id,arrival_s,adapter,prompt_tokens,output_tokens\n")
    text("garbage", "\x00\x01\x02not,a,csv\n\"unterminated\n")
    text("not_parquet", "hello", "parquet")
    text("semicolon", base.to_csv(index=False, sep=";"))
    text("bom", "\ufeff" + base.to_csv(index=False))
    text("crlf", base.to_csv(index=False).replace("\n", "\r\n"))
    text("trace_json", "{}", "json")
    # catalogs
    advs = sorted(base["adapter"].dropna().unique())
    put("cat_ok", pd.DataFrame({"adapter": advs, "rank": 8}))
    put("cat_missing", pd.DataFrame({"adapter": advs[:2], "rank": 8}))
    put("cat_rank0", pd.DataFrame({"adapter": advs, "rank": 0}))
    put("cat_rank_big", pd.DataFrame({"adapter": advs, "rank": 64}))
    put("cat_rank_text", pd.DataFrame({"adapter": advs, "rank": "eight"}))
    put("cat_dup", pd.DataFrame({"adapter": advs + advs[:1], "rank": 8}))
    put("cat_norank", pd.DataFrame({"adapter": advs}))
    put("cat_numeric", pd.DataFrame({"adapter": [str(i) for i in range(5)], "rank": 8}))
    text("cat_empty", "adapter,rank\n")
    # YAML configs
    text("cfg_ok", "max_loras: 4\nmax-cpu-loras: 8\n", "yaml")
    text("cfg_list", "- 1\n- 2\n", "yaml")
    text("cfg_bad_yaml", "max_loras: [1, 2\n", "yaml")
    text("cfg_unknown", "max_lorass: 4\n", "yaml")
    text("cfg_str", "max_loras: four\n", "yaml")
    text("cfg_neg", "max_loras: -3\n", "yaml")
    text("cfg_float", "max_loras: 2.5\n", "yaml")
    text("cfg_bool", "max_loras: true\n", "yaml")
    text("cfg_null", "max_loras: null\n", "yaml")
    text("cfg_empty", "", "yaml")
    text("cfg_gmu", "gpu_memory_utilization: 1.5\n", "yaml")
    text("cfg_nan", "gpu_memory_utilization: .nan\n", "yaml")
    text("cfg_both", "max_loras: 4\nmax-loras: 8\n", "yaml")
    text("cfg_binary", "\x00\xff", "yaml")
    # workload specs
    text("ws_ok", "family: rate_classes\nduration_s: 30\nn_adapters: 4\nrates: [0.5]\n"
         "ranks: [8]\nlengths: uniform\n", "yaml")
    text("ws_nofam", "duration_s: 30\n", "yaml")
    text("ws_badfam", "family: nope\n", "yaml")
    text("ws_neg", "family: rate_classes\nduration_s: -5\nn_adapters: 4\nrates: [0.5]\n"
         "ranks: [8]\nlengths: uniform\n", "yaml")
    text("ws_zero_ad", "family: rate_classes\nduration_s: 30\nn_adapters: 0\nrates: [0.5]\n"
         "ranks: [8]\nlengths: uniform\n", "yaml")
    text("ws_grid_empty", "family: rate_classes\nduration_s: 30\nlengths: uniform\n"
         "grid:\n  n_adapters: []\n", "yaml")
    text("ws_grid_scalar", "family: rate_classes\nduration_s: 30\nlengths: uniform\n"
         "grid:\n  n_adapters: 4\n", "yaml")
    text("ws_rates_str", "family: rate_classes\nduration_s: 30\nn_adapters: 4\nrates: fast\n"
         "ranks: [8]\nlengths: uniform\n", "yaml")
    text("ws_rank_bad", "family: rate_classes\nduration_s: 30\nn_adapters: 4\nrates: [0.5]\n"
         "ranks: [0]\nlengths: uniform\n", "yaml")
    text("ws_nan", "family: rate_classes\nduration_s: .nan\nn_adapters: 4\nrates: [0.5]\n"
         "ranks: [8]\nlengths: uniform\n", "yaml")
    text("ws_trace_missing", "family: trace\npath: /nonexistent.parquet\n", "yaml")
    # profiles
    prof = json.loads((REPO / "twin" / "profiles" / "llama31-8b-h100-64gb.json").read_text())
    text("prof_garbage", "{not json", "json")
    text("prof_list", "[]", "json")
    p2 = dict(prof); p2.pop(next(iter(p2))); text("prof_missing_key", json.dumps(p2), "json")
    # calibrate inputs
    text("runs_empty", "max_loras\n")
    text("runs_garbage", "a,b\n1,2\n")
    text("bench_bad", "{\"x\": 1}", "json")
    text("kv_bad", "max_loras,max_lora_rank,kv_cache_tokens\n1,8,-5\n")
    text("load_bad", "adapter_rank,event,duration_ms\n8,teleport,3\n")
    text("load_nan", "adapter_rank,event,duration_ms\n8,load_disk_to_cpu,nan\n")
    # recommender model
    text("model_bad", "{\"x\": 1}", "json")
    f["dir"] = str(d)
    f["missing"] = str(d / "does_not_exist.csv")
    return f


# ---------------------------------------------------------------- checks for silent wrongness

def _summary(out):
    p = Path(out) / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def check_all_rejected(out):
    """Every request over max_model_len: vLLM answers 400 to each, so nothing is offered and
    the verdict must not claim the configuration keeps up with a real load."""
    s = _summary(out)
    if s is None:
        return "no summary.json written"
    return None


def should_refuse(out):
    """The command ran, but the input asks for nothing sensible: it must be refused."""
    return "ran (exit 0) where the input should have been refused"


def check_completed(n):
    def chk(out):
        s = _summary(out)
        if s is None:
            return "no summary.json written"
        c = s.get("completed", s.get("num_completed"))
        if c is not None and int(c) != n:
            return f"completed {c}, expected {n}"
        return None
    return chk


# ---------------------------------------------------------------- cases

def cases(f: dict[str, str], tmp: Path) -> list[tuple[str, list[str], object]]:
    S = ["simulate", "--no-progress"]
    sm = f["small"]
    C: list[tuple[str, list[str], object]] = []

    def add(name, argv, check=None):
        if argv and argv[0] == "compare" and "--out" not in argv:   # default: ./runs/...
            argv = argv + ["--out", out("cmp_" + "".join(c if c.isalnum() else "_"
                                                         for c in name))]
        C.append((name, argv, check))

    def out(name):
        return str(tmp / "out" / name)

    # --- simulate: files
    add("sim ok", S + ["--trace", sm, "--out", out("sim_ok")], check_completed(40))
    add("sim ok parquet", S + ["--trace", f["small_pq"]])
    for k in ["missing", "dir", "empty_file", "header_only", "garbage", "not_parquet",
              "semicolon", "bom", "crlf", "trace_json", "neg_prompt", "zero_output",
              "frac_prompt", "text_arrival", "nan_arrival", "inf_arrival", "neg_arrival",
              "dup_ids", "unsorted", "no_adapter_col", "no_arrival_col", "extra_col",
              "huge_prompt"]:
        add(f"sim trace {k}", S + ["--trace", f[k]])
    add("sim one request", S + ["--trace", f["one"], "--out", out("one")], check_completed(1))
    add("sim all base", S + ["--trace", f["all_base"], "--out", out("allbase")],
        check_completed(40))
    add("sim all base enable-lora false", S + ["--trace", f["all_base"], "--enable-lora",
                                                "false"])
    add("sim adapters enable-lora false", S + ["--trace", sm, "--enable-lora", "false"])
    add("sim all one adapter", S + ["--trace", f["all_one"]])
    add("sim all t0", S + ["--trace", f["all_t0"], "--out", out("t0")], check_completed(40))
    add("sim huge t", S + ["--trace", f["huge_t"], "--out", out("huget")], check_completed(40))
    add("sim huge t window", S + ["--trace", f["huge_t"], "--window-s", "10"])
    add("sim numeric names", S + ["--trace", f["numeric_names"]])
    add("sim numeric names + cat", S + ["--trace", f["numeric_names"], "--catalog",
                                        f["cat_numeric"]])
    add("sim unicode names", S + ["--trace", f["unicode_names"], "--out", out("uni")])
    add("sim all too long", S + ["--trace", f["all_too_long"], "--out", out("toolong")],
        check_all_rejected)
    add("sim window < first arrival", S + ["--trace", f["late_start"], "--window-s", "5",
                                           "--out", out("late")], should_refuse)
    # --- simulate: flags
    for v in ["0", "-1", "nan", "inf", "1e400", "", "1,2", "abc", "0.0001"]:
        add(f"sim --window-s {v!r}", S + ["--trace", sm, "--window-s", v])
    for v in ["0", "-1", "2.5", "99999999999999999999", "", "nan", "1,2"]:
        add(f"sim --max-loras {v!r}", S + ["--trace", sm, "--max-loras", v])
    add("sim max-loras > adapters", S + ["--trace", sm, "--max-loras", "100"])
    add("sim max-cpu-loras < max-loras", S + ["--trace", sm, "--max-loras", "8",
                                              "--max-cpu-loras", "2"])
    add("sim max-lora-rank < catalog rank", S + ["--trace", sm, "--catalog",
                                                 f["cat_rank_big"], "--max-lora-rank", "16"])
    add("sim max-lora-rank 7", S + ["--trace", sm, "--max-lora-rank", "7"])
    add("sim max-lora-rank 0", S + ["--trace", sm, "--max-lora-rank", "0"])
    add("sim max-num-seqs 0", S + ["--trace", sm, "--max-num-seqs", "0"])
    add("sim max-num-batched-tokens 1", S + ["--trace", sm, "--max-num-batched-tokens", "1"])
    add("sim mnbt < max-model-len no chunked", S + ["--trace", sm, "--max-num-batched-tokens",
                                                    "64", "--enable-chunked-prefill", "false"])
    for v in ["0", "1.5", "-0.1", "nan", "1e-9"]:
        add(f"sim --gpu-memory-utilization {v}", S + ["--trace", sm,
                                                      "--gpu-memory-utilization", v])
    for v in ["0", "3", "-16", "1"]:
        add(f"sim --block-size {v}", S + ["--trace", sm, "--block-size", v])
    for v in ["0", "-5", "10", "99999999"]:
        add(f"sim --max-model-len {v}", S + ["--trace", sm, "--max-model-len", v])
    add("sim --policy bogus", S + ["--trace", sm, "--policy", "bogus"])
    add("sim --policy slora", S + ["--trace", sm, "--policy", "slora"])
    add("sim --enable-lora maybe", S + ["--trace", sm, "--enable-lora", "maybe"])
    add("sim --preload-adapters true", S + ["--trace", sm, "--preload-adapters", "true"])
    add("sim --profile bogus", S + ["--trace", sm, "--profile", "bogus"])
    add("sim --profile garbage", S + ["--trace", sm, "--profile", f["prof_garbage"]])
    add("sim --profile list", S + ["--trace", sm, "--profile", f["prof_list"]])
    add("sim --profile missing key", S + ["--trace", sm, "--profile", f["prof_missing_key"]])
    add("sim --profile dir", S + ["--trace", sm, "--profile", f["dir"]])
    for k in ["cat_missing", "cat_rank0", "cat_rank_text", "cat_dup", "cat_norank",
              "cat_empty", "missing", "garbage"]:
        add(f"sim --catalog {k}", S + ["--trace", sm, "--catalog", f[k]])
    for k in ["cfg_ok", "cfg_list", "cfg_bad_yaml", "cfg_unknown", "cfg_str", "cfg_neg",
              "cfg_float", "cfg_bool", "cfg_null", "cfg_empty", "cfg_gmu", "cfg_nan",
              "cfg_both", "cfg_binary", "missing"]:
        add(f"sim --config {k}", S + ["--trace", sm, "--config", f[k]])
    add("sim --plot without --out", S + ["--trace", sm, "--plot"])
    add("sim --out is a file", S + ["--trace", sm, "--out", f["cfg_ok"]])
    add("sim --out unwritable", S + ["--trace", sm, "--out", "/proc/nope/x"])
    add("sim --steps --json", S + ["--trace", sm, "--steps", "--json", "--out", out("steps")])

    # --- trace
    T = ["trace"]
    add("trace no action", T)
    add("trace azure", T + ["azure", "--limit-s", "5", "--adapters", "4", "--out",
                            out("az.parquet")])
    add("trace azure --adapters -1", T + ["azure", "--adapters", "-1", "--limit-s", "5",
                                          "--out", out("az2.parquet")])
    add("trace azure --alpha 0", T + ["azure", "--adapters", "4", "--popularity", "powerlaw",
                                      "--alpha", "0", "--limit-s", "5", "--out",
                                      out("az3.parquet")])
    add("trace azure --alpha nan", T + ["azure", "--adapters", "4", "--popularity",
                                        "powerlaw", "--alpha", "nan", "--limit-s", "5",
                                        "--out", out("az4.parquet")])
    add("trace azure --limit-s 0", T + ["azure", "--limit-s", "0", "--out", out("az5.parquet")])
    add("trace azure --limit-s -3", T + ["azure", "--limit-s", "-3", "--out",
                                         out("az6.parquet")])
    add("trace azure --input missing", T + ["azure", "--input", f["missing"], "--out",
                                            out("az7.parquet")])
    add("trace azure --input garbage", T + ["azure", "--input", f["garbage"], "--out",
                                            out("az8.parquet")])
    add("trace azure --out .txt", T + ["azure", "--limit-s", "5", "--out", out("az.txt")])
    add("trace mooncake", T + ["mooncake", "--limit-s", "5", "--out", out("mc.parquet")])
    add("trace mooncake --input garbage", T + ["mooncake", "--input", f["garbage"], "--out",
                                               out("mc2.parquet")])
    add("trace servegen", T + ["servegen", "--tenants", "4", "--duration-s", "60",
                               "--total-rate", "2", "--out", out("sg.parquet")])
    add("trace servegen --tenants 0", T + ["servegen", "--tenants", "0", "--duration-s", "60",
                                           "--out", out("sg2.parquet")])
    add("trace servegen --start-s 7", T + ["servegen", "--start-s", "7", "--duration-s", "60",
                                           "--out", out("sg3.parquet")])
    add("trace servegen --model bogus", T + ["servegen", "--model", "bogus", "--out",
                                             out("sg4.parquet")])
    add("trace servegen --total-rate 0", T + ["servegen", "--total-rate", "0", "--tenants",
                                              "4", "--duration-s", "60", "--out",
                                              out("sg5.parquet")])
    add("trace servegen --duration-s 1e12", T + ["servegen", "--tenants", "4",
                                                 "--duration-s", "1e12", "--total-rate", "1",
                                                 "--out", out("sg6.parquet")])
    RC = T + ["rate-classes", "--lengths", "uniform"]
    add("trace rate-classes ok", RC + ["--adapters", "4", "--duration-s", "10", "--out",
                                       out("rc.csv")])
    add("trace rate-classes --adapters 0", RC + ["--adapters", "0", "--duration-s", "10",
                                                 "--out", out("rc2.csv")])
    add("trace rate-classes --rates ''", RC + ["--adapters", "4", "--rates", "", "--out",
                                               out("rc3.csv")])
    add("trace rate-classes --rates -1", RC + ["--adapters", "4", "--rates", "-1",
                                               "--duration-s", "10", "--out", out("rc4.csv")])
    add("trace rate-classes --rates 0", RC + ["--adapters", "4", "--rates", "0",
                                              "--duration-s", "10", "--out", out("rc5.csv")])
    add("trace rate-classes --rates nan", RC + ["--adapters", "4", "--rates", "nan,1",
                                                "--duration-s", "10", "--out", out("rc6.csv")])
    add("trace rate-classes --rates 1e9", RC + ["--adapters", "4", "--rates", "1e9",
                                                "--duration-s", "10", "--out", out("rc6b.csv")])
    add("trace rate-classes --duration-s 0", RC + ["--adapters", "4", "--duration-s", "0",
                                                   "--out", out("rc7.csv")])
    add("trace rate-classes --arrival gamma no cv", RC + ["--adapters", "4", "--arrival",
                                                          "gamma", "--duration-s", "10",
                                                          "--out", out("rc8.csv")])
    add("trace rate-classes --cv 0", RC + ["--adapters", "4", "--arrival", "gamma", "--cv",
                                           "0", "--duration-s", "10", "--out", out("rc9.csv")])
    add("trace rate-classes --cv -1", RC + ["--adapters", "4", "--arrival", "gamma", "--cv",
                                            "-1", "--duration-s", "10", "--out",
                                            out("rc10.csv")])
    add("trace rate-classes --uniform 5,2", RC + ["--adapters", "4", "--uniform", "5,2",
                                                  "--duration-s", "10", "--out",
                                                  out("rc11.csv")])
    add("trace rate-classes --uniform 0,1", RC + ["--adapters", "4", "--uniform", "0,1",
                                                  "--duration-s", "10", "--out",
                                                  out("rc12.csv")])
    add("trace rate-classes --uniform x", RC + ["--adapters", "4", "--uniform", "x",
                                                "--duration-s", "10", "--out", out("rc13.csv")])
    add("trace rate-classes --prefix ''", RC + ["--adapters", "4", "--prefix", "",
                                                "--duration-s", "10", "--out", out("rc14.csv")])
    add("trace rate-classes sharegpt means 0", T + ["rate-classes", "--adapters", "4",
                                                    "--target-means", "0,0", "--duration-s",
                                                    "10", "--out", out("rc15.csv")])
    add("trace rate-classes sharegpt max-total 1", T + ["rate-classes", "--adapters", "4",
                                                        "--max-total", "1", "--duration-s",
                                                        "10", "--out", out("rc16.csv")])
    add("trace rate-classes --out dir", RC + ["--adapters", "4", "--duration-s", "10", "--out",
                                              f["dir"]])
    PL = T + ["powerlaw", "--lengths", "uniform", "--duration-s", "10"]
    add("trace powerlaw ok", PL + ["--adapters", "8", "--rate", "2", "--out", out("pl.csv")])
    add("trace powerlaw --rate 0", PL + ["--adapters", "8", "--rate", "0", "--out",
                                         out("pl2.csv")])
    add("trace powerlaw --rate -2", PL + ["--adapters", "8", "--rate", "-2", "--out",
                                          out("pl3.csv")])
    add("trace powerlaw --alpha 0", PL + ["--adapters", "8", "--rate", "2", "--alpha", "0",
                                          "--out", out("pl4.csv")])
    add("trace powerlaw --alpha -1", PL + ["--adapters", "8", "--rate", "2", "--alpha", "-1",
                                           "--out", out("pl5.csv")])
    add("trace powerlaw --cv 0", PL + ["--adapters", "8", "--rate", "2", "--cv", "0",
                                       "--out", out("pl6.csv")])
    add("trace powerlaw --cv inf", PL + ["--adapters", "8", "--rate", "2", "--cv", "inf",
                                         "--out", out("pl7.csv")])
    add("trace powerlaw no --rate", PL + ["--adapters", "8", "--out", out("pl8.csv")])
    add("trace powerlaw --adapters 10^12", PL + ["--adapters", "1000000000000", "--rate", "2",
                                                 "--out", out("pl9.csv")])

    # --- execute (tiny model)
    E = ["execute", "--no-progress", "--model", "tiny", "--limit", "6", "--time-scale", "0.01"]
    add("exec ok", E + ["--trace", sm, "--make-adapters", "4", "--max-loras", "2",
                        "--out", out("ex_ok")], check_completed(6))
    add("exec --limit 0", ["execute", "--no-progress", "--model", "tiny", "--limit", "0",
                           "--trace", sm, "--make-adapters", "2"], should_refuse)
    add("exec --limit -1", ["execute", "--no-progress", "--model", "tiny", "--limit", "-1",
                            "--trace", sm, "--make-adapters", "2"], should_refuse)
    add("exec --time-scale 0", ["execute", "--no-progress", "--model", "tiny", "--limit", "3",
                                "--time-scale", "0", "--trace", sm, "--make-adapters", "2"])
    add("exec --time-scale -1", ["execute", "--no-progress", "--model", "tiny", "--limit",
                                 "3", "--time-scale", "-1", "--trace", sm,
                                 "--make-adapters", "2"])
    add("exec --time-scale nan", ["execute", "--no-progress", "--model", "tiny", "--limit",
                                  "3", "--time-scale", "nan", "--trace", sm,
                                  "--make-adapters", "2"])
    add("exec --make-adapters 0", E + ["--trace", sm, "--make-adapters", "0"])
    add("exec --make-adapters -2", E + ["--trace", sm, "--make-adapters", "-2"])
    add("exec no adapters", E + ["--trace", sm])
    add("exec all base no adapters", E + ["--trace", f["all_base"]])
    add("exec --ranks 0", E + ["--trace", sm, "--make-adapters", "2", "--ranks", "0"])
    add("exec --ranks x", E + ["--trace", sm, "--make-adapters", "2", "--ranks", "x"])
    add("exec --ranks 32 > max-lora-rank", E + ["--trace", sm, "--make-adapters", "2",
                                                "--ranks", "32"])
    add("exec --adapters missing", E + ["--trace", sm, "--adapters", f["missing"]])
    add("exec --adapters empty dir", E + ["--trace", sm, "--adapters", str(tmp / "emptydir")])
    add("exec --adapters catalog no path", E + ["--trace", sm, "--adapters", f["cat_ok"]])
    add("exec --model bogus", E + ["--trace", sm, "--make-adapters", "2", "--model", "bogus"])
    add("exec --model dir", E + ["--trace", sm, "--make-adapters", "2", "--model", f["dir"]])
    add("exec --device bogus", E + ["--trace", sm, "--make-adapters", "2", "--device",
                                    "bogus"])
    add("exec --device cuda (none)", E + ["--trace", sm, "--make-adapters", "2", "--device",
                                          "cuda"])
    add("exec --threads 0", E + ["--trace", sm, "--make-adapters", "2", "--threads", "0"])
    add("exec --threads -1", E + ["--trace", sm, "--make-adapters", "2", "--threads", "-1"])
    add("exec --num-gpu-blocks 0", E + ["--trace", sm, "--make-adapters", "2",
                                        "--num-gpu-blocks", "0"])
    add("exec --num-gpu-blocks 1", E + ["--trace", sm, "--make-adapters", "2",
                                        "--num-gpu-blocks", "1"])
    add("exec --kv-cache-gib 0", E + ["--trace", sm, "--make-adapters", "2",
                                      "--kv-cache-gib", "0"])
    add("exec --kv-cache-gib nan", E + ["--trace", sm, "--make-adapters", "2",
                                        "--kv-cache-gib", "nan"])
    add("exec --window-s 0", E + ["--trace", sm, "--make-adapters", "2", "--window-s", "0"])
    add("exec --plot no out", E + ["--trace", sm, "--make-adapters", "2", "--plot"])
    add("exec one request", E + ["--trace", f["one"], "--make-adapters", "1"])
    add("exec unicode names", E + ["--trace", f["unicode_names"], "--make-adapters", "3"])
    add("exec all too long", E + ["--trace", f["all_too_long"], "--make-adapters", "2"])
    add("exec max-cpu-loras < max-loras", E + ["--trace", sm, "--make-adapters", "2",
                                               "--max-loras", "4", "--max-cpu-loras", "2"])
    add("exec --policy slora", E + ["--trace", sm, "--make-adapters", "2", "--policy",
                                    "slora"])
    add("exec garbage trace", E + ["--trace", f["garbage"], "--make-adapters", "2"])

    # --- make-adapters
    M = ["make-adapters", "--model", "tiny"]
    add("mk ok", M + ["--n", "2", "--out", out("mk_ok")])
    add("mk --n 0", M + ["--n", "0", "--out", out("mk0")])
    add("mk --n -1", M + ["--n", "-1", "--out", out("mk1")])
    add("mk --ranks 0", M + ["--n", "2", "--ranks", "0", "--out", out("mk2")])
    add("mk --ranks ''", M + ["--n", "2", "--ranks", "", "--out", out("mk3")])
    add("mk --ranks 1e9", M + ["--n", "1", "--ranks", "1000000000", "--out", out("mk4")])
    add("mk --ranks 8,,16", M + ["--n", "2", "--ranks", "8,,16", "--out", out("mk5")])
    add("mk --trace all base", M + ["--n", "2", "--trace", f["all_base"], "--out", out("mk6")])
    add("mk --trace garbage", M + ["--n", "2", "--trace", f["garbage"], "--out", out("mk7")])
    add("mk --out is file", M + ["--n", "2", "--out", f["cfg_ok"]])
    add("mk --model bogus", ["make-adapters", "--model", "bogus", "--n", "2", "--out",
                             out("mk8")])

    # --- calibrate
    CA = ["calibrate", "--quiet"]
    add("cal nothing", CA + ["--out", out("c0.json")])
    add("cal no --out", CA + ["--from-vllm-runs", f["runs_garbage"]])
    add("cal runs missing", CA + ["--from-vllm-runs", f["missing"], "--out", out("c1.json")])
    add("cal runs empty", CA + ["--from-vllm-runs", f["runs_empty"], "--out", out("c2.json")])
    add("cal runs garbage", CA + ["--from-vllm-runs", f["runs_garbage"], "--out",
                                  out("c3.json")])
    add("cal runs binary", CA + ["--from-vllm-runs", f["garbage"], "--out", out("c4.json")])
    add("cal bench json no meta", CA + ["--from-vllm-runs", f["bench_bad"], "--out",
                                        out("c5.json")])
    add("cal bench json bad cfg", CA + ["--from-vllm-runs", f["bench_bad"], "--bench-config",
                                        f["cfg_bad_yaml"], "--out", out("c6.json")])
    add("cal kv bad", CA + ["--kv-capacity", f["kv_bad"], "--out", out("c7.json")])
    add("cal load bad", CA + ["--load-times", f["load_bad"], "--out", out("c8.json")])
    add("cal load nan", CA + ["--load-times", f["load_nan"], "--out", out("c9.json")])
    add("cal --base-profile bogus", CA + ["--kv-capacity", f["kv_bad"], "--base-profile",
                                          "bogus", "--out", out("c10.json")])
    add("cal --max-runs 0", CA + ["--from-vllm-runs", f["runs_garbage"], "--max-runs", "0",
                                  "--out", out("c11.json")])
    add("cal --iterations -1", CA + ["--from-vllm-runs", f["runs_garbage"], "--iterations",
                                     "-1", "--out", out("c12.json")])
    add("cal exec --budget 0", CA + ["--executor", "--model", "tiny", "--budget", "0",
                                     "--out", out("c13.json")])
    add("cal exec --repeats 0", CA + ["--executor", "--model", "tiny", "--repeats", "0",
                                      "--budget", "1", "--out", out("c14.json")])
    add("cal exec --threads 0", CA + ["--executor", "--model", "tiny", "--threads", "0",
                                      "--budget", "1", "--out", out("c15.json")])
    add("cal exec --device-memory-gib -1", CA + ["--executor", "--model", "tiny",
                                                                 "--device-memory-gib", "-1", "--budget", "1",
                                                 "--out", out("c16.json")], should_refuse)
    add("cal exec + runs", CA + ["--executor", "--from-vllm-runs", f["runs_garbage"],
                                 "--out", out("c17.json")])

    # --- validate
    V = ["validate", "--no-progress", "--profile", "cpu-tiny", "--model", "tiny", "--limit",
         "4", "--time-scale", "0.01"]
    add("val ok", V + ["--trace", sm, "--max-loras", "2", "--json"])
    add("val --profile h100 with tiny", ["validate", "--no-progress", "--profile",
                                         "llama31-8b-h100-64gb", "--model", "tiny", "--limit",
                                         "4", "--time-scale", "0.01", "--trace", sm],
        should_refuse)
    add("val --repeats 0", V + ["--trace", sm, "--repeats", "0"], should_refuse)
    add("val --limit 0", ["validate", "--no-progress", "--profile", "cpu-tiny", "--model",
                          "tiny", "--limit", "0", "--trace", sm], should_refuse)
    add("val --num-gpu-blocks 0", V + ["--trace", sm, "--num-gpu-blocks", "0"])
    add("val garbage trace", V + ["--trace", f["garbage"]])
    add("val all base", V + ["--trace", f["all_base"]])
    add("val --time-scale 0", ["validate", "--no-progress", "--profile", "cpu-tiny", "--model",
                               "tiny", "--limit", "3", "--time-scale", "0", "--trace", sm],
        should_refuse)

    # --- sweep
    SW = ["sweep", "--no-progress", "--window-s", "20", "--slots", "1,2", "--workers", "1"]
    add("sweep ok", SW + ["--workloads", f["ws_ok"], "--out", out("sw_ok")])
    for k in ["ws_nofam", "ws_badfam", "ws_neg", "ws_zero_ad", "ws_grid_empty",
              "ws_grid_scalar", "ws_rates_str", "ws_rank_bad", "ws_nan", "ws_trace_missing",
              "cfg_bad_yaml", "cfg_empty", "missing", "cfg_list"]:
        add(f"sweep --workloads {k}", SW + ["--workloads", f[k], "--out", out("sw_" + k)])
    add("sweep --slots ''", ["sweep", "--no-progress", "--window-s", "20", "--slots", "",
                             "--workloads", f["ws_ok"], "--out", out("sw_s1")])
    add("sweep --slots 0,-1", ["sweep", "--no-progress", "--window-s", "20", "--slots", "0,-1",
                               "--workloads", f["ws_ok"], "--out", out("sw_s2")])
    add("sweep --slots x", ["sweep", "--no-progress", "--window-s", "20", "--slots", "x",
                            "--workloads", f["ws_ok"], "--out", out("sw_s3")])
    add("sweep --window-s 0", ["sweep", "--no-progress", "--window-s", "0", "--slots", "1",
                               "--workloads", f["ws_ok"], "--out", out("sw_w0")])
    add("sweep --workers 0", ["sweep", "--no-progress", "--window-s", "20", "--slots", "1",
                              "--workers", "0", "--workloads", f["ws_ok"],
                              "--out", out("sw_k0")])
    add("sweep --base-config bad", SW + ["--workloads", f["ws_ok"], "--base-config",
                                         f["cfg_str"], "--out", out("sw_bc")])
    add("sweep --out is file", SW + ["--workloads", f["ws_ok"], "--out", f["cfg_ok"]])

    # --- train
    add("train --rate-range 5,1", ["train", "--no-progress", "--quick", "--no-install",
                                   "--rate-range", "5,1", "--out", out("tr1")])
    add("train --rate-range x", ["train", "--no-progress", "--quick", "--no-install",
                                 "--rate-range", "x", "--out", out("tr2")])
    add("train --families bogus", ["train", "--no-progress", "--quick", "--no-install",
                                   "--families", "bogus", "--out", out("tr3")])
    add("train --window-s -1", ["train", "--no-progress", "--quick", "--no-install",
                                "--window-s", "-1", "--out", out("tr4")])
    add("train --workers 0", ["train", "--no-progress", "--quick", "--no-install",
                              "--workers", "0", "--out", out("tr5")])
    add("train --window-s nan", ["train", "--no-progress", "--quick", "--no-install",
                                 "--window-s", "nan", "--out", out("tr6")])

    # --- recommend / place
    for cmd in ["recommend", "place"]:
        R = [cmd, "--workers", "1", "--max-runs", "1"]
        if cmd == "recommend":
            R.append("--no-plot")
        add(f"{cmd} ok", R + ["--trace", sm, "--out", out(cmd + "_ok")])
        add(f"{cmd} all base", R + ["--trace", f["all_base"], "--out", out(cmd + "_ab")])
        add(f"{cmd} one request", R + ["--trace", f["one"], "--out", out(cmd + "_one")])
        add(f"{cmd} all t0", R + ["--trace", f["all_t0"], "--out", out(cmd + "_t0")])
        add(f"{cmd} garbage", R + ["--trace", f["garbage"], "--out", out(cmd + "_g")])
        add(f"{cmd} --catalog missing adapters", R + ["--trace", sm, "--catalog",
                                                      f["cat_missing"], "--out",
                                                      out(cmd + "_cm")])
        add(f"{cmd} --workload-spec bad", R + ["--workload-spec", f["ws_badfam"], "--out",
                                               out(cmd + "_ws")])
        add(f"{cmd} --workload-spec ok", R + ["--workload-spec", f["ws_ok"], "--out",
                                              out(cmd + "_wsok")])
        add(f"{cmd} --window-s 0", R + ["--trace", sm, "--window-s", "0", "--out",
                                        out(cmd + "_w0")])
        add(f"{cmd} --max-runs 0", [cmd, "--workers", "1", "--max-runs", "0", "--trace", sm,
                                    "--out", out(cmd + "_mr0")], should_refuse)
        add(f"{cmd} --model bad", R + ["--trace", sm, "--model", f["model_bad"], "--out",
                                       out(cmd + "_mb")])
        add(f"{cmd} --base-config list", R + ["--trace", sm, "--base-config", f["cfg_list"],
                                              "--out", out(cmd + "_bc")])
    add("recommend --slo junk", ["recommend", "--no-plot", "--objective", "goodput", "--slo",
                                 "ttft=abc", "--trace", sm, "--out", out("rec_slo")])
    add("recommend goodput no slo", ["recommend", "--no-plot", "--objective", "goodput",
                                     "--workers", "1", "--max-runs", "1", "--trace", sm,
                                     "--out", out("rec_slo2")])
    add("place --max-gpus 0", ["place", "--workers", "1", "--max-runs", "1", "--max-gpus", "0",
                               "--trace", sm, "--out", out("pl_mg0")])

    # --- compare
    CO = ["compare"]
    add("compare ok", CO + ["--trace", sm])
    add("compare --policies ''", CO + ["--trace", sm, "--policies", ""])
    add("compare --policies bogus", CO + ["--trace", sm, "--policies", "vllm,bogus"])
    add("compare --gpus 0", CO + ["--trace", sm, "--gpus", "0"])
    add("compare --hybrid-k 0", CO + ["--trace", sm, "--policies", "hybrid", "--hybrid-k", "0"])
    add("compare --hybrid-k 100", CO + ["--trace", sm, "--policies", "hybrid", "--hybrid-k",
                                        "100"])
    add("compare --merged-min-kv-tokens -1", CO + ["--trace", sm, "--policies", "merged",
                                                   "--merged-min-kv-tokens", "-1"])
    add("compare all base", CO + ["--trace", f["all_base"]])
    add("compare one request", CO + ["--trace", f["one"]])
    add("compare all too long", CO + ["--trace", f["all_too_long"]])
    add("compare --window-s -1", CO + ["--trace", sm, "--window-s", "-1"])
    add("compare --max-loras 0", CO + ["--trace", sm, "--max-loras", "0"])
    add("compare unicode", CO + ["--trace", f["unicode_names"], "--out", out("cmp_uni")])
    add("compare --catalog missing", CO + ["--trace", sm, "--catalog", f["cat_missing"]])
    return C


# ---------------------------------------------------------------- running

def run_case(case, timeout, env):
    name, argv, check = case
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "twin.cli", *argv], capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return name, "hang", None, f"> {timeout}s", time.monotonic() - t0
    err = p.stderr.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    first = lines[-1] if lines else ""
    if "Traceback (most recent call last)" in err:
        cls = "traceback"
    elif p.returncode == 0:
        cls, why = "ok", None
        if check is not None:
            outdir = next((argv[i + 1] for i, a in enumerate(argv) if a == "--out"), None)
            why = check(outdir)
        if why:
            cls, first = "wrong", why
    elif p.returncode == 2:
        # argparse's usage errors are two lines (usage + message): still a one-line message
        cls = "input"
    elif p.returncode == 70:
        cls = "internal"
    elif p.returncode == 3 and argv[0] in ("recommend", "place"):
        cls = "ok"          # exit 3: no verified configuration -- an answer, not a crash
        if check is should_refuse:
            cls, first = "wrong", should_refuse(None)
    else:
        cls = "traceback"
    return name, cls, p.returncode, first[:160], time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("--marked", action="store_true",
                    help="run only the cases that must be refused (silently wrong when ok)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=180)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    shared = REPO.parents[1] / "shared" / "data"      # a worktree under /work/wt/NAME
    if "TWIN_SHARED_DATA" not in env and shared.is_dir():
        env["TWIN_SHARED_DATA"] = str(shared)
    with tempfile.TemporaryDirectory(prefix="twin-probe-") as td:
        tmp = Path(td)
        (tmp / "emptydir").mkdir()
        (tmp / "in").mkdir()
        files = build_files(tmp / "in")
        todo = [c for c in cases(files, tmp) if (not args.only or args.only in c[0])
                and (not args.marked or c[2] is should_refuse)]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: run_case(c, args.timeout, env), todo))
    counts: dict[str, int] = {}
    w = max(len(r[0]) for r in results)
    for name, cls, rc, msg, dt in results:
        counts[cls] = counts.get(cls, 0) + 1
        print(f"{name:<{w}}  {cls:<9}  {str(rc):>4}  {dt:5.1f}s  {msg}")
    counts["total"] = len(results)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
