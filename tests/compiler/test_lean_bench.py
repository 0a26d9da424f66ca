"""`tapernorm bench` (benchmarks/bench_peers.py) runs end to end on tiny settings and writes JSON, markdown and a
PNG. No timing is asserted: speed goals live in benchmarks/results/peers.md."""
import json

from tapernorm.compiler import cli


def test_bench_peers_tiny(tmp_path):
    rc = cli.main(["bench", "--widths", "64", "--batches", "2", "--rounds", "1", "--warmup", "0", "--depth", "1",
                   "--vocab", "128", "--max-seq", "48", "--prompt-len", "8", "--new-tokens", "4", "--head-dim", "16",
                   "--profile-steps", "2", "--no-genai", "--no-compile", "--cache", str(tmp_path / "cache"),
                   "--out", str(tmp_path / "res")])
    assert rc == 0
    res = json.loads((tmp_path / "res" / "peers.json").read_text())
    c = res["configs"][0]
    assert {"lean_folded", "lean_unfused", "lean_baseline", "generic_folded", "eager", "lean_folded_aa"} <= set(
        c["variants"])
    assert c["variants"]["lean_unfused"]["greedy_agreement_with_lean_folded"] == 1.0
    assert c["ratios"]["lean_folded / generic_folded"]["n"] == 1 and res["bandwidth"]["read_gb_s"] > 0
    assert c["ort_nodes"]["lean_folded"]["nodes"] < c["ort_nodes"]["generic_folded"]["nodes"]
    assert "| lean_folded |" in (tmp_path / "res" / "peers.md").read_text()
    assert (tmp_path / "res" / "peers.png").stat().st_size > 1000
