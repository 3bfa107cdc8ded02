"""`python -m bench md --quick` runs every part at a tiny size and its JSON holds the fields RESULTS.md quotes.

No timing or accuracy is checked (the numbers live in bench/RESULTS.md); the quick committee is the shipped
model with weight noise, not trained members.
"""
import json

from bench.__main__ import build_parser, main

from test_bench import one_thread  # noqa: F401  (autouse: one torch thread here and in child processes)


def test_md_parses():
    a = build_parser().parse_args(["md", "--long", "--models", "si", "--every", "1,5"])
    assert a.stage == "md" and a.long


def test_md_quick_writes_every_field(tmp_path, capsys):
    out = tmp_path / "md.json"
    assert main(["md", "--quick", "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["stage"] == "md" and doc["command"].startswith("python -m bench md")
    parts = doc["parts"]
    # cost: every calculator's ratio, the fresh-error pattern of error_every, the memory children
    timing = parts["cost"]["timing"][0]
    assert "error" not in timing, timing.get("error")
    assert set(timing["ratio"]) == {"plain", "energy", "joint8", "joint8_every5", "joint8_every10"}
    assert all(v > 0 for v in timing["ratio"].values()) and timing["ratio"]["plain"] == 1.0
    assert all(timing["fresh_is_every_kth_call"].values())
    assert "ntkal_force_error" in timing["example_results"]
    mem = {m["config"]: m for m in parts["cost"]["memory"]}
    assert all("error" not in m for m in mem.values()), mem
    assert mem["joint8"]["peak_ratio"] > 0 and mem["plain"]["peak_rss_md_mib"] > 0
    assert parts["cost"]["goals"]
    # committee against ntkal: metrics per method, costs, error_every's misses, per-frame records
    c = parts["committee"]
    assert {r["method"] for r in c["methods"]} == {"ntkal", "committee max", "committee mean"}
    nt = next(r for r in c["methods"] if r["method"] == "ntkal")
    for key in ("spearman", "auroc_p90", "recall_own_p90", "recall_matched_p90", "ratio_median_in",
                "ratio_median_out"):
        assert key in nt
    assert c["n_frames"] == len(c["frames"]) > 0
    assert {"real_f", "pred_f", "cmax", "cmean", "plain_s", "committee_s", "ntkal_call_s"} <= set(c["frames"][0])
    assert c["cost"]["committee_over_plain_call"] > 0 and c["cost"]["ntkal_call_over_plain_call"] > 0
    assert {"p90 k=1 vs k1", "p90 k=5 vs real"} <= set(c["every"])
    assert "QUICK" in c["members"]["recipe"]
    # memory over a (short) run: samples and a slope
    m = parts["memory"]
    assert len(m["samples"]) >= 3 and m["slope_mib_per_1000_steps"] is not None
    assert "Cost per MD step" in capsys.readouterr().out


def test_md_novelty_scores_every_frame_against_emt(tmp_path, capsys):
    """bench.md_novelty at tiny sizes: every frame has its real errors and each kernel's PV and energy error,
    and the summary's Spearmans are those of the frames."""
    import numpy as np
    from scipy.stats import spearmanr

    from bench import md_novelty
    out = tmp_path / "novelty.json"
    assert md_novelty.main(["--starts", "test_id:1,test_ood_metal:1", "--md-steps", "3", "--pretrain-size", "4",
                            "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    frames, summary = doc["results"][0]["frames"], doc["results"][0]["summary"]
    assert len(frames) == 8 and {f["run"] for f in frames} == {0, 1}
    for f in frames:
        assert f["real_f"] > 0 and f["real_e"] >= 0
        assert all(f[f"{k}_pv"] > 0 and f[f"{k}_energy_error"] > 0 for k in md_novelty.KERNELS)
        assert all(f[k] > 0 for k in md_novelty.FORCE_PARTS + ("model_force_rms", "emt_force_rms"))
        assert f["force_row_pv"] < f["force_row_norm2"]  # Λ ⪰ I: PV ≤ ‖g‖² row by row
        assert f["atom_pv_max"] > 0 and f["atom_nn_max"] > 0 and 0.5 < f["min_distance"] < 3
        assert 0 < f["atom_pv_ads"] <= f["atom_pv_max"] and 0 < f["atom_nn_ads"] <= f["atom_nn_max"]
        assert min(f["real_f_ads"], f["real_f_metal"]) <= f["real_f"] <= max(f["real_f_ads"], f["real_f_metal"])
    drift = {d["quantity"]: d for d in doc["results"][0]["drift"]}
    assert set(drift) == set(md_novelty.DRIFT)
    runs = [[f for f in frames if f["run"] == r] for r in (0, 1)]
    want = np.median([fs[-1]["real_f"] / fs[0]["real_f"] for fs in runs])
    assert abs(drift["real_f"]["median last / first"] - want) < 1e-12
    row = next(r for r in summary if r["score"] == "energy_pv")
    want = spearmanr([f["energy_pv"] for f in frames], [f["real_f"] for f in frames])[0]
    assert abs(row["real_f all"] - want) < 1e-12 and len(row["real_f per run"]) == 2
    assert doc["command"].startswith("python -m bench.md_novelty") and "| energy_pv |" in capsys.readouterr().out


def test_atom_novelty_is_zero_distance_on_a_labelled_structure_and_grows_when_squeezed():
    """AtomNovelty: a labelled structure's atoms are their own nearest labelled atoms (distance 0), and moving one
    atom close to another raises both per-atom scores."""
    import numpy as np
    import torch

    import ntkal
    from bench import bench_md, md_novelty
    files, train, _ = bench_md.oc20_sets(0, n_train=4)
    fz = ntkal.MACEFeaturizer(str(files["model"]), kernel="embedding", dtype=torch.float64)
    nov = md_novelty.AtomNovelty(fz, train)
    own = nov(train[0])
    assert own["atom_nn_max"] < 1e-6
    squeezed = train[0].copy()
    i, j = 0, 1 + int(np.argmin(squeezed.get_distances(0, range(1, len(squeezed)), mic=True)))
    squeezed.positions[i] += 0.5 * squeezed.get_distance(i, j, mic=True, vector=True)
    moved = nov(squeezed)
    assert moved["atom_nn_max"] > 0.1 and moved["atom_pv_max"] > own["atom_pv_max"]
    assert moved["min_distance"] < own["min_distance"]


def test_probe_vmap_times_both_routes(tmp_path):
    """bench.probe_vmap on the smallest case: both routes timed on the same structure, the ratio theirs."""
    from bench import probe_vmap
    out = tmp_path / "vmap.json"
    assert probe_vmap.main(["--cases", "si:1,1,1", "--rounds", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["atoms"] == 8 and len(row["times"]["vmapped"]) == len(row["times"]["loop"]) == 2
    assert abs(row["vmapped_over_loop"] - row["vmapped_s"] / row["loop_s"]) < 1e-12


def test_md_refit_scores_round_two_with_every_variant(tmp_path, capsys):
    """bench.md_refit at tiny sizes: the round-1 harvest (every k-th frame, not frame 0) enters the "after"
    posterior only and fits the "recalibrated" line; every round-2 frame has each variant's prediction and its
    real error, and the metrics are the frames'."""
    import numpy as np

    from bench import md_refit
    out = tmp_path / "refit.json"
    assert md_refit.main(["--starts", "test_id:1,test_ood_metal:1", "--md-steps", "2", "--harvest-every", "1",
                          "--seeds", "1", "--pretrain-size", "2", "--n-train", "4", "--sketch-dim", "64",
                          "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    res = doc["results"][0]
    frames, m = res["frames"], res["metrics"]
    assert res["n_harvest"] == 4 and len(frames) == 6 and doc["n_train"] == 4
    assert all(f["real_f"] > 0 and f["pred_before"] > 0 and f["pred_after"] > 0 and f["pred_recalibrated"] > 0
               for f in frames)
    assert any(abs(f["pred_after"] - f["pred_before"]) > 1e-9 * f["pred_before"] for f in frames)
    a, b = res["recalibration_line"]  # fitted on the harvest, applied to before's errors
    assert all(abs(f["pred_recalibrated"] - np.exp(a) * f["pred_before"] ** b) <= 1e-9 * f["pred_recalibrated"]
               for f in frames)
    for name in md_refit.VARIANTS:
        ratio = [f[f"pred_{name}"] / f["real_f"] for f in frames if f["in_region"]]
        assert abs(m[name]["ratio_in"] - float(np.median(ratio))) < 1e-12
    assert {r["variant"] for r in doc["summary"]} == set(md_refit.VARIANTS)
    assert doc["command"].startswith("python -m bench.md_refit") and "| after | ratio_in |" in capsys.readouterr().out


def test_calculator_cost_records_each_calculator_against_mace(tmp_path, capsys):
    """bench.calculator_cost at a tiny size: every calculator's median step and its ratio to MACECalculator's
    (1 for MACECalculator itself), in the bench's common record (command, machine, versions)."""
    from bench import calculator_cost
    out = tmp_path / "cost.json"
    assert calculator_cost.main(["--steps", "1", "--n-train", "2", "--sketch-dim", "16", "--probes", "2",
                                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    names = {"mace", "energy", "joint", "energy, error_every=10", "joint, error_every=10"}
    assert set(doc["ratio_to_mace"]) == names and doc["ratio_to_mace"]["mace"] == 1.0
    assert {r["calculator"] for r in doc["results"]} == names and all(r["median_step_s"] > 0 for r in doc["results"])
    assert doc["command"].startswith("python -m bench.calculator_cost --steps 1") and "machine" in doc
    # each error step split into the model call with its rows and the posterior's scoring; the wrap is undone
    from ntkal.features import fast
    for name in ("energy", "joint"):
        part = doc["median_part_s"][name]
        assert 0 < part["posterior_error"] and 0 < part["features_and_model"] <= doc["median_step_s"][name]
    assert fast.rows_and_outputs.__module__ == "ntkal.features.fast" and fast.rows_and_outputs.__name__ == "rows_and_outputs"
    assert "joint, error_every=10" in capsys.readouterr().out


def test_gpu_summary_reads_the_calculator_records(tmp_path):
    """bench/gpu/summarize.py turns run.sh's calculator_cost records into goal lines (met / missed per kernel)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("summarize", Path(__file__).parents[1] / "bench/gpu/summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    doc = {"natoms": 512, "median_step_s": {"mace": 0.01}, "ratio_to_mace": {"mace": 1.0, "energy": 1.2, "joint": 5.0}}
    (tmp_path / "calculator512.json").write_text(json.dumps(doc))
    assert summarize.main(str(tmp_path)) == 0
    line = next(x for x in (tmp_path / "summary.md").read_text().splitlines() if "512 atoms" in x)
    assert "energy 1.20×, joint 5.00×" in line and "energy met, joint missed" in line
    # mp0-medium's joint goal is 12x (issue 17), and a CUDA record's step memory is shown
    doc = dict(doc, arch="mp0-medium", natoms=65, dtype="float64",
               ratio_to_mace={"mace": 1.0, "energy": 2.0, "joint": 5.7},
               cuda_step_extra_mib={"mace": 500.0, "energy": 560.0, "joint": 6900.0})
    (tmp_path / "calculator_mp0.json").write_text(json.dumps(doc))
    assert summarize.main(str(tmp_path)) == 0
    line = next(x for x in (tmp_path / "summary.md").read_text().splitlines() if "mp0-medium, 65 atoms" in x)
    assert "joint 8 probes ≤ 12.0×" in line and "energy missed, joint met" in line and "joint 6900 MiB" in line


def test_calculator_cost_on_a_foundation_architecture(tmp_path):
    """--arch: the random-weight architecture on bench_md's slab with its EMT-labelled posterior, same record."""
    from bench import calculator_cost
    out = tmp_path / "cost.json"
    assert calculator_cost.main(["--arch", "tiny", "--n-atoms", "10", "--steps", "1", "--sketch-dim", "16",
                                 "--probes", "2", "--profile", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["arch"] == "tiny" and doc["dataset"] is None and doc["natoms"] >= 10 and doc["n_params"] > 0
    assert doc["ratio_to_mace"]["mace"] == 1.0 and doc["ratio_to_mace"]["joint"] > 0
    assert doc["cuda_step_extra_mib"] is None  # a CPU run has no CUDA memory figures
    # --profile: per calculator a profiled step's wall time, device kernel time (none on a CPU) and busiest ops
    for name in ("mace", "energy", "joint"):
        p = doc["profile"][name]
        assert p["steps"] == 1 and p["wall_ms_per_step"] > 0 and p["kernel_ms_per_step"] == 0
        assert p["launches_per_step"] == 0 and len(p["top_cpu_ms_per_step"]) > 0
