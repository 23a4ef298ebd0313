"""Inputs every serving strategy checks the same way (twin.policies): the catalog (unknown
adapters, PEFT kinds a strategy cannot serve), GPU counts, strategy flags of `twin compare`."""

from __future__ import annotations

import pandas as pd
import pytest

from twin.cli import main
from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.errors import TwinInputError
from twin.policies import POLICY_CLASSES, get_policy, simulate_policy
from twin.policies.compare import compare
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import powerlaw_trace

PROFILE = load_profile()


def cfg(**kw):
    base = dict(max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_model_len=2048)
    base.update(kw)
    return ServingConfig(**base)


@pytest.fixture(scope="module")
def trace():
    return powerlaw_trace(4, 2.0, alpha=0.5, duration_s=10, seed=3)


def peft_catalog(trace) -> AdapterCatalog:
    """The trace's 4 adapters as LoRA, IA3, prefix and prompt tuning (in name order)."""
    names = sorted(trace["adapter"].dropna().unique())
    return AdapterCatalog(pd.DataFrame({
        "adapter": names, "rank": [8, 0, 0, 0],
        "kind": ["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING"],
        "virtual_tokens": [0, 0, 5, 5]}), source="peft.csv")


# -- 1: an adapter the catalog lacks -------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICY_CLASSES))
def test_every_strategy_refuses_an_adapter_missing_from_the_catalog(trace, name):
    names = sorted(trace["adapter"].dropna().unique())
    cat = AdapterCatalog(pd.DataFrame({"adapter": names[:2], "rank": 8}), source="cat2.csv")
    first = int(trace.index[~trace["adapter"].isin(names[:2])][0])
    with pytest.raises(TwinInputError) as e:
        simulate_policy(trace, cfg(policy=name), PROFILE, cat, trace_source="t.parquet")
    assert e.value.field == "adapter" and e.value.file == "t.parquet"
    assert e.value.row == first
    assert "unknown adapter" in str(e.value) and "cat2.csv" in str(e.value)


def test_compare_checks_every_strategys_catalog_before_running_any(trace, monkeypatch):
    ran = []
    split = POLICY_CLASSES["split"]
    monkeypatch.setattr(split, "simulate", lambda self, *a, **k: ran.append(1))
    with pytest.raises(TwinInputError, match="S-LoRA serves LoRA adapters only"):
        compare(trace, cfg(), PROFILE, peft_catalog(trace), policies=["split", "slora"])
    assert not ran


# -- 2: PEFT kinds ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,who", [("vllm", "vLLM serves LoRA"),
                                      ("slora", "S-LoRA serves LoRA"),
                                      ("hybrid", "hybrid's dynamic servers")])
def test_lora_only_strategies_refuse_other_peft_kinds(trace, name, who):
    with pytest.raises(TwinInputError) as e:
        get_policy(name).simulate(trace, cfg(policy=name), PROFILE, peft_catalog(trace))
    msg, cat = str(e.value), peft_catalog(trace)
    assert e.value.field == "kind" and e.value.file == "peft.csv" and e.value.row >= 1
    a = cat.adapters[e.value.row]
    assert f"adapter {a!r} is {cat.kind(a)}: " in msg
    assert who in msg and "the split strategy" in msg
    assert "--policy split" not in msg     # the flag differs between simulate and compare


def test_merged_merges_lora_and_ia3_but_refuses_prefix_and_prompt_tuning(trace):
    cat = peft_catalog(trace)
    with pytest.raises(TwinInputError) as e:
        get_policy("merged").simulate(trace, cfg(policy="merged"), PROFILE, cat)
    assert e.value.field == "kind" and e.value.row in (2, 3)
    a = cat.adapters[e.value.row]
    assert f"adapter {a!r} is {cat.kind(a)}: " in str(e.value)
    assert "cannot be merged" in str(e.value)
    # LoRA and IA3 only: merged serves both
    two = trace[trace["adapter"].isin(cat.adapters[:2]) | trace["adapter"].isna()]
    run = get_policy("merged").simulate(two.reset_index(drop=True), cfg(policy="merged"),
                                        PROFILE, cat)
    assert run.result.summary["completed"] == len(two)


def test_split_serves_every_peft_kind(trace):
    run = get_policy("split", clients=2).simulate(trace, cfg(policy="split"), PROFILE,
                                                   peft_catalog(trace))
    assert run.result.summary["completed"] == len(trace)


def test_the_vllm_servers_own_check_names_the_split_strategy(trace):
    with pytest.raises(TwinInputError, match="serve other PEFT kinds with the split strategy"):
        simulate_policy(trace, cfg(), PROFILE, peft_catalog(trace))


# -- 3: `twin execute` refuses what `twin simulate` refuses --------------------------------
def test_execute_refuses_other_peft_kinds_up_front_as_simulate_does(trace, tmp_path, capsys):
    """The check runs before the model loads: the catalog's paths need not exist."""
    cat = peft_catalog(trace)
    t = cat.table.assign(path=[str(tmp_path / a) for a in cat.adapters])
    t.to_csv(tmp_path / "peft.csv", index=False)
    trace.to_parquet(tmp_path / "t.parquet", index=False)
    common = ["--trace", str(tmp_path / "t.parquet"), "--max-model-len", "256"]
    refusals = []
    for cmd in (["simulate", "--catalog", str(tmp_path / "peft.csv"), "--policy", "vllm"],
                ["execute", "--adapters", str(tmp_path / "peft.csv"), "--model",
                 str(tmp_path / "no-model"), "--max-loras", "4"]):
        assert main([*cmd, *common]) == 2
        refusals.append(capsys.readouterr().err.strip().split(": error: ", 1)[1])
    assert refusals[0] == refusals[1]
    assert "field 'kind'" in refusals[1] and "vLLM serves LoRA adapters only" in refusals[1]


# -- 5: split prices virtual tokens but reports the requests' own prompts ----------------
def test_split_reports_the_users_prompt_tokens_and_prices_virtual_ones(trace):
    cat = peft_catalog(trace)
    one = AdapterCatalog(cat.table.assign(virtual_tokens=[0, 0, 1, 1]), source="peft.csv")
    pol = get_policy("split", clients=2, log_batches=True)
    with_v = pol.simulate(trace, cfg(policy="split"), PROFILE, cat).result
    without = pol.simulate(trace, cfg(policy="split"), PROFILE, one).result
    req = with_v.requests
    assert list(req["prompt_tokens"]) == list(trace["prompt_tokens"])
    virtual = int(trace["adapter"].isin(cat.adapters[2:]).sum()) * (5 - 1)
    assert with_v.summary["completed"] == len(trace)
    # served tokens: the requests' own, however many virtual tokens their adapters add
    served = (req["prompt_tokens"] + req["generated_tokens"]).sum()
    assert served == (without.requests["prompt_tokens"]
                      + without.requests["generated_tokens"]).sum()
    # priced: the clients' prefills hold every virtual token
    steps = with_v.extras["client_steps"]["num_prefill_tokens"].sum()
    assert steps == without.extras["client_steps"]["num_prefill_tokens"].sum() + virtual


# -- 6: hybrid's GPU count and k --------------------------------------------------------------
@pytest.mark.parametrize("k,gpus,need", [(4, 2, 4), (4, 3, 4), (3, 2, 4), (2, 2, 3)])
def test_hybrid_refuses_too_few_gpus_whether_or_not_every_adapter_is_hot(trace, k, gpus, need):
    with pytest.raises(TwinInputError, match=f"needs at least {need} GPUs.*got {gpus}") as e:
        get_policy("hybrid", k=k).deploy(trace, cfg(policy="hybrid"), PROFILE, None, gpus)
    assert e.value.field == "gpus"


def test_hybrid_with_every_adapter_hot_deploys_on_the_gpus_asked(trace):
    pol = get_policy("hybrid", k=4)
    assert pol.deploy(trace, cfg(policy="hybrid"), PROFILE, None, None).gpus == 4
    dep = pol.deploy(trace, cfg(policy="hybrid"), PROFILE, None, 5)
    assert dep.gpus == 5 and len(dep.servers) == 5
    assert {s.kind for s in dep.servers} == {"merged"}
    assert len({s.gpu for s in dep.servers}) == 5
    assert (dep.route >= 0).all()


def test_hybrid_with_k_above_the_traces_adapters_merges_them_all(trace):
    """A k above the adapters a trace (or a short window of it) names merges every one,
    with no dynamic part, on as many GPUs: the same deployment as k = their number."""
    big = get_policy("hybrid", k=5).deploy(trace, cfg(policy="hybrid"), PROFILE, None, None)
    four = get_policy("hybrid", k=4).deploy(trace, cfg(policy="hybrid"), PROFILE, None, None)
    assert big.gpus == four.gpus == 4 and list(big.route) == list(four.route)


# -- 7: merged's own option is blamed, not the config ----------------------------------------
def test_merged_min_kv_tokens_too_large_names_the_option(trace, tmp_path, capsys):
    trace.to_parquet(tmp_path / "t.parquet", index=False)
    assert main(["compare", "--trace", str(tmp_path / "t.parquet"), "--policies", "merged",
                 "--merged-min-kv-tokens", "10000000", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--merged-min-kv-tokens" in err and "max_model_len" not in err
    with pytest.raises(TwinInputError) as e:
        get_policy("merged", min_kv_tokens=10_000_000).deploy(trace, cfg(), PROFILE, None)
    assert e.value.field == "min_kv_tokens"


# -- 8: a strategy's flags without the strategy are refused, like --split-costs ----------------
@pytest.mark.parametrize("flag,value,reader", [
    ("--clients", "8", "split"), ("--client-devices", "cpu", "split"),
    ("--finetune-tokens-per-s", "100", "split"), ("--link", "network", "split"),
    ("--split-costs", "costs.json", "split"), ("--hybrid-k", "3", "hybrid"),
    ("--hybrid-dynamic", "slora", "hybrid"), ("--merged-min-kv-tokens", "100", "merged"),
    ("--slora-admission", "on_demand",
     "the slora policy and the hybrid policy with --hybrid-dynamic slora read")])
def test_compare_refuses_strategy_flags_no_strategy_reads(trace, tmp_path, capsys, monkeypatch,
                                                         flag, value, reader):
    import twin.cli.compare as cmd

    ran = []
    monkeypatch.setattr(cmd, "compare", lambda *a, **k: ran.append(1))
    trace.to_parquet(tmp_path / "t.parquet", index=False)
    rc = main(["compare", "--trace", str(tmp_path / "t.parquet"), "--policies", "vllm", flag,
               value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and ran == [] and f"field '{flag}'" in err
    assert f"only {reader if ' ' in reader else f'the {reader} policy reads'}" in err


def test_slora_admission_is_read_by_hybrid_only_with_slora_dynamic_servers(trace, tmp_path,
                                                                           capsys, monkeypatch):
    """Hybrid's S-LoRA admission rule applies to its dynamic servers only when they are
    S-LoRA's (--hybrid-dynamic slora): with vLLM's, --slora-admission was ignored."""
    import twin.cli.compare as cmd

    ran = []
    monkeypatch.setattr(cmd, "compare", lambda *a, **k: ran.append(1))
    trace.to_parquet(tmp_path / "t.parquet", index=False)
    base = ["compare", "--trace", str(tmp_path / "t.parquet"), "--policies", "hybrid",
            "--slora-admission", "on_demand"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2 and ran == []
    assert "field '--slora-admission'" in capsys.readouterr().err
    main([*base, "--hybrid-dynamic", "slora", "--out", str(tmp_path / "b")])
    assert ran == [1]


def test_empty_client_device_items_are_refused(trace, tmp_path, capsys):
    trace.to_parquet(tmp_path / "t.parquet", index=False)
    assert main(["compare", "--trace", str(tmp_path / "t.parquet"), "--policies", "split",
                 "--client-devices", "same,,cpu", "--out", str(tmp_path / "o")]) == 2
    assert "field '--client-devices': empty item" in capsys.readouterr().err
    with pytest.raises(TwinInputError, match="empty item") as e:
        get_policy("split", devices="same,")
    assert e.value.field == "devices"


# -- 9: split clients beyond the adapters would idle ----------------------------------------
def test_split_refuses_more_clients_than_adapters_unless_the_trace_routes_them(trace):
    with pytest.raises(TwinInputError, match="8 clients serves 4 adapter.*at most 4") as e:
        get_policy("split", clients=8).deploy(trace, cfg(policy="split"), PROFILE, None)
    assert e.value.field == "clients"
    dep = get_policy("split", clients=4).deploy(trace, cfg(policy="split"), PROFILE, None)
    assert all(s.adapters for s in dep.servers)      # every client serves an adapter
    routed = trace.assign(client=trace.index % 8)    # the trace's own routing: any count
    dep = get_policy("split", clients=8).deploy(routed, cfg(policy="split"), PROFILE, None)
    assert sorted(set(dep.route)) == list(range(8))
    # the default (4 clients) is not refused on fewer adapters: `twin simulate --policy
    # split` has no --clients flag, and a base-model trace has no adapter at all
    two = trace[trace["adapter"].isin(sorted(trace["adapter"].dropna().unique())[:2])]
    dep = get_policy("split").deploy(two, cfg(policy="split"), PROFILE, None)
    assert len(dep.servers) >= 1
    base = trace.assign(adapter=pd.array([None] * len(trace), dtype="string"))
    get_policy("split").deploy(base, cfg(policy="split"), PROFILE, None)


def test_execute_reads_the_kinds_of_an_adapter_folder_without_a_catalog(trace, tmp_path,
                                                                        capsys):
    """An adapters folder without catalog.csv: each adapter's kind is its
    adapter_config.json's peft_type, so IA3 / prefix-tuning adapters are refused before the
    model loads (the folder's catalog had no kind column: every adapter read as LoRA, and
    the non-LoRA ones failed at run time, or as LoRA adapters of rank 0)."""
    import json

    cat = peft_catalog(trace)
    root = tmp_path / "adapters"
    for a in cat.adapters:
        (root / a).mkdir(parents=True)
        cfg = {"peft_type": cat.kind(a), "task_type": "CAUSAL_LM"}
        if cat.kind(a) == "LORA":
            cfg.update(r=8, lora_alpha=16, target_modules=["q_proj"])
        (root / a / "adapter_config.json").write_text(json.dumps(cfg))
    trace.to_parquet(tmp_path / "t.parquet", index=False)
    rc = main(["execute", "--adapters", str(root), "--model", str(tmp_path / "no-model"),
               "--max-loras", "4", "--trace", str(tmp_path / "t.parquet"),
               "--max-model-len", "256"])
    err = capsys.readouterr().err
    assert rc == 2 and "field 'kind'" in err and "vLLM serves LoRA adapters only" in err


def test_compare_says_hybrid_reads_slora_admission_only_with_dynamic_slora(trace, tmp_path, capsys,
                                                                          monkeypatch):
    """hybrid in --policies without --hybrid-dynamic slora does not read --slora-admission: the
    refusal says so (not 'names neither', which a user naming hybrid would not believe)."""
    import twin.cli.compare as cmd

    ran = []
    monkeypatch.setattr(cmd, "compare", lambda *a, **k: ran.append(1))
    trace.to_parquet(tmp_path / "t.parquet", index=False)
    rc = main(["compare", "--trace", str(tmp_path / "t.parquet"), "--policies", "vllm,hybrid",
               "--slora-admission", "on_demand", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and ran == []
    assert "names hybrid without --hybrid-dynamic slora" in err and "names neither" not in err
    main(["compare", "--trace", str(tmp_path / "t.parquet"), "--policies", "vllm,hybrid",
          "--hybrid-dynamic", "slora", "--slora-admission", "on_demand",
          "--out", str(tmp_path / "o2")])
    assert ran == [1] and "only the" not in capsys.readouterr().err   # compare was reached
