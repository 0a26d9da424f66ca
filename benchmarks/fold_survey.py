"""Survey: the All-Taper fold on every causal-LM family the installed transformers ships.

Each family is built from one generic tiny config (vocab 128, hidden 32, 2 layers, 4 heads, 2 KV heads,
head_dim 8; latent-attention and a few other families get their own dims, `OVERRIDES`), taperized in
All-Taper mode, norm gains randomised, calibrated on random tokens, set to gate 0 and folded with `fold(model, (ids,))`. A row records: norms tapered / folded (of them backwards),
statistic ops left, the verify max abs diff, the reason of every site kept, or the error (a family the
generic config cannot build, a norm taperize refuses, ...). Not a speed benchmark; no timings asserted.

    .venv/bin/python benchmarks/fold_survey.py                      # all families (~7 min on a quiet 2-core box)
    .venv/bin/python benchmarks/fold_survey.py --families llama,gemma2,qwen3
    .venv/bin/python benchmarks/fold_survey.py --rows rows.jsonl    # append rows; re-run to resume
    .venv/bin/python benchmarks/fold_survey.py --render rows.jsonl  # markdown/JSON from saved rows

Writes fold_survey.{json,md} into a scratch directory (benchmarks/results/ with --save).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_output_args, library_versions, machine_info, output_dir, write_results  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


# multi-head latent attention (DeepSeek-V2/V3 style) wants its own head dims and as many KV heads as heads
_MLA = dict(num_key_value_heads=4, head_dim=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
            kv_lora_rank=16, q_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1, n_group=1, topk_group=1)
OVERRIDES = {f: _MLA for f in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "minicpm3", "longcat_flash",
                               "glm4_moe_lite", "glm_moe_dsa", "sarvam_mla", "youtu", "axk1", "axk2")}
OVERRIDES.update(gptj={"rotary_dim": 4}, codegen={"rotary_dim": 4},
                 gpt_neo={"attention_types": [[["global", "local"], 1]], "num_layers": 2})


def _config_kwargs(fam: str) -> dict:
    kw = {**BASE, **OVERRIDES.get(fam, {})}
    return {k: v for k, v in kw.items() if v is not None}


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout("timeout")


def survey_family(fam: str, timeout_s: int = 90) -> dict:
    """One row: build, taperize (all), calibrate, gate 0, fold; see the module docstring."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from tapernorm import calibrate, set_gate, taperize
    from tapernorm.passes import fold
    from tapernorm.passes.capture import no_cache_default
    from tapernorm.passes.match import stat_ops
    rec = {"family": fam}
    t0 = time.time()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    stage = "config"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            kw = _config_kwargs(fam)
            try:
                cfg = AutoConfig.for_model(fam, **kw)
            except Exception:  # noqa: BLE001 - configs that refuse head_dim
                cfg = AutoConfig.for_model(fam, **{k: v for k, v in kw.items() if k != "head_dim"})
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
        rec["class"] = type(model).__name__
        stage = "taperize"
        names = taperize(model, "all")
        rec["tapered"] = len(names)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, m in model.named_modules():
                if n in names:
                    m.weight.uniform_(0.5, 1.5)
        ids = [torch.randint(3, 128, (2, 8), generator=g) for _ in range(2)]
        stage = "calibrate"

        def forward(mm, b):
            with no_cache_default(mm, (b,)):  # hybrid caches refuse some calls; the fold sets the same default
                return mm(b)

        calibrate(model, ids, forward=forward)
        set_gate(model, 0.0)
        model.eval()
        stage = "fold"
        gm, rep = fold(model, (ids[0],))
        rec.update(folded=rep["folded"], backward=sum(r.get("direction") == "backward" for r in rep["layers"].values()),
                   stat_ops_after=stat_ops(gm), max_abs_diff=rep["verify"]["max_abs_diff"],
                   kept={k: v["reason"] for k, v in rep["layers"].items() if v["status"] != "folded"})
        rec["status"] = "all folded" if rep["folded"] == len(names) else "some kept"
    except Exception as e:  # noqa: BLE001 - a survey row records the failure and moves on
        rec["status"] = f"error at {stage}"
        rec["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    finally:
        signal.alarm(0)
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def _kinds(kept: dict) -> list[str]:
    """One reason per norm kind (the last path component), layer index dropped."""
    seen, out = set(), []
    for name, reason in kept.items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in seen:
            seen.add(kind)
            out.append(reason.replace("|", "/"))
    return out


def render(rows: list[dict]) -> tuple[dict, str]:
    """(JSON result, markdown) for survey rows."""
    import transformers
    counts = Counter(r["status"] for r in rows)
    result = {"machine": machine_info(), "versions": {**library_versions(("torch", "transformers")),
                                                        "transformers": transformers.__version__},
              "config": BASE, "counts": dict(counts), "rows": rows}
    md = [f"# All-Taper fold across transformers {transformers.__version__} causal-LM families\n",
          f"{len(rows)} families (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), one generic tiny config each "
          f"(`benchmarks/fold_survey.py`).\n", "| status | families |", "| --- | --- |"]
    md += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    folded = [r for r in rows if r["status"] == "all folded"]
    md += ["", f"## Every norm folded ({len(folded)})", "",
           ", ".join(f"{r['family']} ({r['folded']}{', ' + str(r['backward']) + ' backward' if r['backward'] else ''})"
                     for r in folded), "", "## Some sites kept, with the report's reasons", "",
           "| family | folded / tapered | why (one per norm kind) |", "| --- | --- | --- |"]
    md += [f"| {r['family']} | {r['folded']} / {r['tapered']} | {'<br>'.join(_kinds(r['kept']))} |"
           for r in rows if r["status"] == "some kept"]
    md += ["", "## Not surveyed (error)", "", "| family | stage | error |", "| --- | --- | --- |"]
    md += [f"| {r['family']} | {r['status'][9:]} | {r['error'].replace('|', '/')[:200]} |"
           for r in rows if r["status"].startswith("error")]
    return result, "\n".join(md) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="comma-separated model types (default: every causal-LM family)")
    ap.add_argument("--render", metavar="JSONL", help="only render saved rows (one JSON object a line; the last row "
                                                      "of a family wins)")
    ap.add_argument("--rows", metavar="JSONL", help="also append each row here as it completes")
    ap.add_argument("--max-gb", type=int, default=10, help="address-space cap: a family that needs more is an error row")
    add_output_args(ap)  # fold_survey.{json,md}: scratch directory by default, benchmarks/results/ with --save
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.render:  # a later row of the same family replaces an earlier one (re-runs appended)
        by_family = {}
        for line in Path(args.render).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_family[row["family"]] = row
        rows = sorted(by_family.values(), key=lambda r: r["family"])
    else:
        import torch
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(1)
        fams = args.families.split(",") if args.families else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        done = set()
        if args.rows and Path(args.rows).exists() and not args.families:  # resume an interrupted survey
            done = {json.loads(x)["family"] for x in Path(args.rows).read_text().splitlines() if x.strip()}
        resource.setrlimit(resource.RLIMIT_AS, (args.max_gb << 30, resource.RLIM_INFINITY))  # MemoryError, not OOM
        rows = []
        for fam in fams:
            if fam in done:
                continue
            rows.append(survey_family(fam))
            print(fam, rows[-1]["status"], rows[-1].get("error", "")[:120], flush=True)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    result, md = render(rows)
    js, mdp = write_results(output_dir(args) / "fold_survey", result, md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
