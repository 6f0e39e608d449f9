"""stm_fast.bench on a small configuration: the rows carry what docs/performance.md's table and --json promise."""

import json
import statistics

import pytest

from stm_fast import bench, ssm

SMALL = dict(img_size=32, patch_size=4, embed_dim=16, depth=6, d_state=4, num_classes=5)


@pytest.fixture(scope="module")
def rows():
    return bench.run_bench(["vim_tiny"], methods=["stm", "tome"], rates=[0.2, 0.3], batch_size=2, rounds=2,
                           warmup=1, progress=False, overrides=SMALL, device="cpu")  # "cpu" also on a GPU machine


def test_rows_have_throughput_speedup_and_step_cost(rows):
    assert [(r["method"], r["rate"]) for r in rows] == [("none", 0.0), ("stm", 0.2), ("stm", 0.3),
                                                          ("tome", 0.2), ("tome", 0.3)]
    base = rows[0]
    assert base["speedup"] == 1.0 and base["step_ms"] is None and base["step_share"] is None
    for r in rows:
        assert r["images_per_s"] > 0 and r["ideal_speedup"] > 0
        assert r["realized_over_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
        assert r["batch_size"] == 2 and r["dtype"] == "fp32" and r["device"].startswith("cpu")
        # one same-round speedup per round; if each round's ratio exceeds c, so does the ratio of the medians
        lo, hi = min(r["speedup_per_round"]), max(r["speedup_per_round"])
        assert len(r["speedup_per_round"]) == 2 and lo * (1 - 1e-12) <= r["speedup"] <= hi * (1 + 1e-12)
    for r in rows[1:]:
        assert abs(r["achieved_rate"] - r["rate"]) <= 0.01
        assert r["ideal_speedup"] > 1
        assert r["step_ms"] > 0 and 0 < r["step_share"] < 1


def test_table_and_json_output(rows, tmp_path, capsys):
    text = bench.table(rows)
    assert text.splitlines()[0].startswith("| model | backend | method | rate | images/s | speedup | rounds' speedups | "
                                           "ideal | realized/ideal")
    assert len([line for line in text.splitlines() if line.startswith("| vim_tiny")]) == len(rows)
    out = tmp_path / "b.json"
    assert bench.main(["--model", "vim_tiny", "--methods", "stm", "--rates", "0.2", "--rounds", "1", "--warmup", "0",
                       "--device", "cpu",
                       "--batch-size", "1", "--json", str(out)]
                      + [a for kv in ("img_size=32", "patch_size=4", "embed_dim=16", "depth=4", "d_state=4")
                         for a in ("--override", kv)]) == 0
    data = json.loads(out.read_text())
    for key in ("model", "method", "rate", "batch_size", "dtype", "device", "images_per_s", "speedup",
                "ideal_speedup", "realized_over_ideal", "step_ms", "step_share"):
        assert key in data[0]
    assert f"| vim_tiny | {ssm.resolve_backend(None, 'cpu')} | stm | 20% |" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--override", "depth=four"])
    assert "--override takes KEY=INTEGER, got 'depth=four'" in capsys.readouterr().err


def test_rates_given_as_percentages_are_a_clear_error(capsys):
    """`--rates 20 40` would otherwise skip every configuration and time only the baseline."""
    with pytest.raises(SystemExit):
        bench.main(["--rates", "20", "0.4"])
    assert "--rates must be in [0, 1) (a fraction: 0.2 means 20%), got 20.0" in capsys.readouterr().err


def test_two_backends_are_timed_in_the_same_rounds_and_compared():
    """--backend fused torch: each backend's rows against its own baseline, each configuration's time ratio to
    the other backend's (per round and median), and the floor beside each CPU fp32 baseline."""
    backends = [b for b in ("fused", "torch") if b in ssm.available_backends("cpu")]
    if len(backends) < 2:
        pytest.skip("the fused CPU kernel does not build here")
    rows = bench.run_bench(["vim_tiny"], methods=["stm"], rates=[0.2], batch_size=2, rounds=3, warmup=0,
                           progress=False, overrides=SMALL, device="cpu", backends=backends, check=False)
    assert [(r["backend"], r["method"]) for r in rows] == [("fused", "none"), ("fused", "stm"), ("torch", "none"),
                                                           ("torch", "stm")]
    by = {(r["backend"], r["method"]): r for r in rows}
    for method in ("none", "stm"):
        f, t = by[("fused", method)], by[("torch", method)]
        ratios = f["speedup_over_backend_per_round"]["torch"]
        assert len(ratios) == 3 and min(ratios) <= f["speedup_over_backend"]["torch"] <= max(ratios)
        # the same rounds seen from the other side: each round's ratio inverted
        assert t["speedup_over_backend_per_round"]["fused"] == pytest.approx([1 / r for r in ratios])
    floor = by[("fused", "none")]["floor"]
    assert floor["floor_s"] == pytest.approx(floor["matmul_s"] + floor["exp_s"]) and floor["exps"] > 0
    assert len(floor["floor_per_round"]) == 3, "the matrix products are timed in every round, beside the forwards"
    base = by[("fused", "none")]
    ratios = [t / f for t, f in zip(base["seconds_per_round"], floor["floor_per_round"])]
    assert base["over_floor"] == pytest.approx(statistics.median(ratios))
    assert by[("fused", "stm")]["floor"] is None
    notes = bench.table(rows).splitlines()
    assert any(line.startswith("vim_tiny fused: forward ") and "x the floor" in line for line in notes)
    assert any(line.startswith("vim_tiny fused: baseline forward ") and "as fast as torch" in line for line in notes)


def test_a_backend_that_cannot_run_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--backend", "mamba_ssm", "--device", "cpu"])
    assert e.value.code == 2 and "scan backend 'mamba_ssm' cannot run on cpu" in capsys.readouterr().err


def test_the_rmeeto_protocol_runs_half_models_in_blocks_and_says_so():
    """--protocol rmeeto: model.half() under fp16 autocast, blocks of 30 forwards, every row naming the protocol,
    dtype, TF32 settings (None off CUDA) and the backends that ran; given options replace the preset's."""
    rows = bench.run_bench(["vim_tiny"], methods=["stm"], rates=[0.2], batch_size=2, rounds=1, warmup=1,
                           progress=False, overrides=dict(SMALL, depth=2), device="cpu", protocol="rmeeto")
    for r in rows:
        assert r["protocol"] == "rmeeto" and r["dtype"] == "fp16" and r["half_model"] is True
        assert r["forwards_per_round"] == 30 and r["batch_size"] == 2 and r["warmup"] == 1
        assert r["tf32"] is None and r["backends_ran"]
        assert r["self_check"]["precision"] == "fp16" and r["self_check"]["amp_backend"]
    assert "protocol rmeeto: batch 2, fp16 (model.half())" in bench.table(rows)
    with pytest.raises(ValueError, match="unknown protocol 'tome'"):
        bench.run_bench(["vim_tiny"], protocol="tome", device="cpu")
