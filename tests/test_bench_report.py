"""What the benchmark tells its reader besides the timings: the run's conditions
(machine, --quick or full, load at the start and the end, noisy or quiet) in every
output, goals that a noisy run does not judge, and result files that never replace
an earlier run's without being asked to."""

from __future__ import annotations

import csv
import json

import pytest

from gradclip.bench import cli, env, report

TINY_RUN = ["bench", "--quick", "--workload", "tiny-2000", "--dtype", "fp32", "--mode", "norm-noclip",
            "--contender", "torch_foreach", "--repeat", "2", "--warmup", "1", "--ceiling-mib", "8",
            "--no-progress", "--no-plots"]


def _meta(**extra):
    meta = {"device": "cpu", "cpu_model": "Test CPU", "gpu_name": "", "cpu_count": 2, "quick": True,
            "loadavg_start": 0.1, "loadavg_end": 1.9, "other_busy_cores": 0.01, "noisy": False}
    meta.update(extra)
    return meta


def _result(noisy: bool):
    row = {"workload": "tiny-2000", "dtype": "fp32", "mode": "norm-noclip", "contender": "gradclip",
           "median_s": 1e-3, "speedup_vs_best_torch_eager": 20.0, "fraction_of_ceiling": 0.9}
    return {"meta": _meta(noisy=noisy), "rows": [row]}


def test_other_processes_cpu_time_makes_a_run_noisy(monkeypatch):
    hz = 100
    monkeypatch.setattr(env.os, "sysconf", lambda name: hz)
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(env.time, "monotonic", lambda: next(clock))
    # Busy jiffies of all CPUs and of this process, at the start and the end of a 10 s run:
    # the machine was busy 2000 jiffies, 1700 of them this process's: others used 0.3 cores.
    readings = iter([(1000, 500), (3000, 2200)])
    monkeypatch.setattr(env, "_busy_jiffies", lambda: next(readings))
    quiet = env.Quietness()
    out = quiet.finish(cpu_count=2)
    assert out["other_busy_cores"] == pytest.approx(0.3)
    assert out["noisy"] is True  # 0.3 of 2 cores > the 10% share

    clock = iter([0.0, 10.0])
    readings = iter([(1000, 500), (3000, 2450)])  # others: 50 jiffies in 10 s = 0.05 cores
    monkeypatch.setattr(env.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(env, "_busy_jiffies", lambda: next(readings))
    out = env.Quietness().finish(cpu_count=2)
    assert out["other_busy_cores"] == pytest.approx(0.05) and out["noisy"] is False


def test_without_proc_the_start_load_decides(monkeypatch):
    monkeypatch.setattr(env, "_busy_jiffies", lambda: None)
    monkeypatch.setattr(env, "load_average", lambda: 1.5)
    out = env.Quietness().finish(cpu_count=2)
    assert out["other_busy_cores"] is None and out["noisy"] is True


def test_the_real_busy_counters_are_read():
    reading = env._busy_jiffies()
    if reading is None:
        pytest.skip("no /proc on this system")
    busy, own = reading
    assert busy >= own >= 0


def test_a_noisy_run_judges_no_goal():
    quiet = report.goals(_result(noisy=False))
    noisy = report.goals(_result(noisy=True))
    assert [g["verdict"] for g in quiet] == [report.MET]  # 20x >= 15x
    assert [g["verdict"] for g in noisy] == [report.NOT_JUDGED]
    text = report.goals_text(noisy)
    assert "met" not in text.replace("measured", "") and "not judged" in text


def test_conditions_name_machine_mode_loads_and_noise():
    text = report.conditions(_meta(noisy=True, quick=True))
    for part in ("Test CPU, 2 cores", "--quick run", "0.10 at the start", "1.90 at the end", "NOISY"):
        assert part in text, (part, text)
    assert "full run" in report.conditions(_meta(quick=False))
    # Results written before these fields existed still describe themselves.
    old = _meta()
    for k in ("loadavg_end", "other_busy_cores", "noisy"):
        del old[k]
    assert "? at the end" in report.conditions(old)


def test_free_stem_never_reuses_an_earlier_runs_files(tmp_path):
    assert cli._free_stem(tmp_path, "run") == "run"
    (tmp_path / "run.json").write_text("{}")
    assert cli._free_stem(tmp_path, "run") == "run-2"
    (tmp_path / "run-2_speedup.png").write_bytes(b"")
    assert cli._free_stem(tmp_path, "run") == "run-3"
    (tmp_path / "runner.json").write_text("{}")  # another stem that merely starts alike
    assert cli._free_stem(tmp_path, "runner-x") == "runner-x"


def test_bench_twice_keeps_both_runs_and_every_output_says_how_it_ran(tmp_path, capsys):
    pytest.importorskip("torch")
    args = TINY_RUN + ["--out", str(tmp_path), "--name", "r"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    second = capsys.readouterr().out
    for stem, out in (("r", first), ("r-2", second)):
        for ext in ("json", "csv", "md"):
            path = tmp_path / f"{stem}.{ext}"
            assert path.is_file() and str(path) in out, (path, out)
        assert "Run: " in out and "--quick run" in out
    result = json.loads((tmp_path / "r.json").read_text())
    meta = result["meta"]
    assert meta["quick"] is True and isinstance(meta["noisy"], bool)
    assert meta["loadavg_end"] is not None and "goals" in result
    assert report.conditions(meta) in (tmp_path / "r.md").read_text()
    with (tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["run_quick"] == "True" and r["run_noisy"] in ("True", "False") for r in rows)
    assert all(r["run_loadavg_start"] != "" and r["run_loadavg_end"] != "" for r in rows)

    # --overwrite replaces the named run instead of adding r-3.
    assert cli.main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "r-3.json").exists()


def test_step_mode_times_clip_plus_fused_step_and_the_clips_added_cost(tmp_path, capsys):
    pytest.importorskip("torch")
    args = ["bench", "--workload", "tiny-2000", "--dtype", "fp32,bf16", "--mode", "step", "--repeat", "3",
            "--warmup", "1", "--ceiling-mib", "8", "--no-progress", "--no-plots", "--out", str(tmp_path),
            "--name", "s"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "s.json").read_text())
    for dtype in ("fp32", "bf16"):
        rows = {r["contender"]: r for r in result["rows"] if r["dtype"] == dtype}
        # Only the contenders that take part in a step: no NumPy or compile rows, and the bare step.
        assert set(rows) == {"gradclip", "torch_foreach", "torch_loop", "no_clip"}, set(rows)
        assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows.values()), rows
        g = rows["gradclip"]
        # The norm each clipping contender saw is the gradients' (checked before timing).
        assert g["norm_rel_error"] < 1e-2 and rows["torch_foreach"]["norm_rel_error"] < 1e-2
        for name in ("gradclip", "torch_foreach", "torch_loop"):
            r = rows[name]
            assert r["clip_cost_s"] == pytest.approx(r["median_s"] - rows["no_clip"]["median_s"])
        assert "clip_cost_s" not in rows["no_clip"]
        best_torch = min(rows["torch_foreach"]["clip_cost_s"], rows["torch_loop"]["clip_cost_s"])
        if best_torch > 0:
            assert g["clip_cost_share_of_torch"] == pytest.approx(g["clip_cost_s"] / best_torch)
    assert "Clip + fused AdamW step" in out and "tiny-2000 bf16" in out
