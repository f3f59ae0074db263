"""The sweep (geo_contrast/sweep.py): its command line, its table against numpy's statistics, resuming an
interrupted grid, a failing cell, and one real cell through `python -m geo_contrast.sweep`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from geo_contrast import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seeds_and_variants_parse_and_bad_ones_are_refused():
    assert sweep.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert sweep.parse_seeds("7,0-2, 2") == [0, 1, 2, 7]
    for bad in ("4-1", "a", "", "-1", "1-"):
        with pytest.raises(sweep.SweepError, match="--seeds"):
            sweep.parse_seeds(bad)
    assert sweep.parse_variants("tp,moco,tp") == ["tp", "moco"]
    with pytest.raises(sweep.SweepError, match="mocco"):
        sweep.parse_variants("mocco,tp")


def test_the_variant_joins_the_config_argument_and_the_seed_is_an_override():
    command = sweep.cell_command("configs/fmow.py:sample", "tp", 3, "/w/tp_seed3", ["--config.x=1"])
    assert command[1:] == ["-m", "geo_contrast.main", "--config=configs/fmow.py:sample,variant=tp",
                           "--workdir=/w/tp_seed3", "--config.seed=3", "--config.x=1"]
    assert sweep.cell_command("configs/fmow.py", "moco", 0, "w", [])[3] == "--config=configs/fmow.py:variant=moco"
    with pytest.raises(sweep.SweepError, match="--variants"):
        sweep.cell_command("configs/fmow.py:variant=tp", "moco", 0, "w", [])


def _results(val, test=None, random_val=None):
    """A results.json's contents with the given top-1 fractions."""
    def entry(v, t):
        return {"splits": {"val": {"top1": v}, **({} if t is None else {"test": {"top1": t}})}}
    out = {"linear_eval": {"pretrained": entry(val, test)}}
    if random_val is not None:
        out["linear_eval"]["random"] = entry(random_val, None)
    return out


def test_the_table_is_mean_and_sample_sd_over_seeds_with_paired_margins():
    values = {"moco": [0.40, 0.45, 0.38], "tp": [0.52, 0.55, 0.60]}
    floors = [0.30, 0.33, 0.29]
    cells = {(v, s): _results(values[v][s], test=values[v][s] - 0.01, random_val=floors[s])
             for v in values for s in range(3)}
    del cells["tp", 2]["linear_eval"]["random"]  # The random row comes from the first variant's cell of a seed.
    table = sweep.aggregate(cells, ["moco", "tp"], [0, 1, 2])
    rows = {row["row"]: row["sections"]["linear_eval"] for row in table["rows"]}
    for variant, vals in values.items():
        val = rows[variant]["val"]
        assert val["top1"]["mean"] == pytest.approx(100 * np.mean(vals))
        assert val["top1"]["sd"] == pytest.approx(100 * np.std(vals, ddof=1))
        margins = 100 * (np.array(vals) - floors)
        assert val["margin_over_random"]["mean"] == pytest.approx(margins.mean())
        assert val["margin_over_random"]["sd"] == pytest.approx(margins.std(ddof=1))
        assert rows[variant]["test"]["top1"]["mean"] == pytest.approx(100 * np.mean(vals) - 1)
        assert val["per_seed"] == {str(s): pytest.approx(100 * v) for s, v in enumerate(vals)}
    assert rows["random init"]["val"]["top1"]["mean"] == pytest.approx(100 * np.mean(floors))
    assert rows["random init"]["val"]["margin_over_random"] is None
    markdown = sweep.render_markdown(table, "python -m geo_contrast.sweep ...")
    assert f"| tp | {100 * np.mean(values['tp']):.2f} ± {100 * np.std(values['tp'], ddof=1):.2f} |" in markdown


def _fake_main(calls, fail=()):
    """A stand-in for the cells' subprocess: writes a results.json from the seed, or fails for cells in `fail`.
    Other commands (libraries call subprocess.run too) run for real."""
    real_run = subprocess.run

    def run(command, stdout=None, stderr=None, env=None, **kwargs):
        if "geo_contrast.main" not in command:
            return real_run(command, stdout=stdout, stderr=stderr, env=env, **kwargs)
        workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
        seed = int(next(a.split("=", 1)[1] for a in command if a.startswith("--config.seed=")))
        calls.append(os.path.basename(workdir))
        assert env["JAX_COMPILATION_CACHE_DIR"]
        if os.path.basename(workdir) in fail:
            stdout.write("step 1/10 loss 4.0\nerror: config.input.image_size=0 must be at least 16.\n")
            return subprocess.CompletedProcess(command, 1)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(_results(0.5 + 0.01 * seed, random_val=0.3), f)
        return subprocess.CompletedProcess(command, 0)
    return run


def test_an_interrupted_or_failed_sweep_reruns_only_its_unfinished_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    calls = []
    args = ["--config=configs/fmow.py:sample", "--variants=moco,tp", "--seeds=0-1", f"--workdir={tmp_path}"]
    monkeypatch.setattr(sweep.subprocess, "run", _fake_main(calls, fail={"tp_seed1"}))
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(args)
    assert exit_info.value.code == 1
    assert calls == ["moco_seed0", "tp_seed0", "moco_seed1", "tp_seed1"]
    out, err = capsys.readouterr()
    assert "tp_seed1: failed (exit 1): error: config.input.image_size=0 must be at least 16." in out
    assert "1 cell(s) failed" in err and "Missing cells (not finished): tp_seed1" in out

    calls.clear()
    monkeypatch.setattr(sweep.subprocess, "run", _fake_main(calls))
    sweep.main(args)
    assert calls == ["tp_seed1"]
    assert "moco_seed0: skipped (finished earlier)" in capsys.readouterr().out
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["missing_cells"] == [] and (tmp_path / "sweep.png").stat().st_size > 0
    assert "| moco | 50.50 ± 0.71 |" in (tmp_path / "table.md").read_text()

    calls.clear()  # The same cell with another command is not the finished one: it runs again.
    sweep.main(args + ["--config.optim.num_epochs=2"])
    assert calls == ["moco_seed0", "tp_seed0", "moco_seed1", "tp_seed1"]


@pytest.mark.parametrize("args, message", [
    (["--variants=moco", "--seeds=0", "--config.seed=1"], "--seeds and --variants"),
    (["--variants=moco", "--seeds=0", "--epochs=3"], "only --config.FIELD=VALUE"),
    (["--variants=foo", "--seeds=0"], "foo"),
])
def test_command_line_mistakes_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        sweep.main(["--config=configs/fmow.py:sample", f"--workdir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_one_real_cell_through_the_command_line(tiny_fmow, env, tmp_path):
    data_dir, _ = tiny_fmow
    command = [sys.executable, "-m", "geo_contrast.sweep", "--config=configs/fmow.py:sample", "--variants=tp",
               "--seeds=1", f"--workdir={tmp_path}", f"--config.dataset.data_dir={data_dir}",
               "--config.dataset.generate_sample=False", "--config.model.width=4", "--config.input.image_size=16",
               "--config.input.global_batch=8", "--config.moco.queue_size=32", "--config.optim.num_epochs=2",
               "--config.linear_eval.image_size=16", "--config.linear_eval.resize_size=16"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "tp_seed1" / "results.json").read_text())
    assert set(results["linear_eval"]) == {"pretrained", "random"}
    table = json.loads((tmp_path / "table.json").read_text())
    tp = table["rows"][0]["sections"]["linear_eval"]["val"]
    assert tp["top1"]["mean"] == pytest.approx(100 * results["linear_eval"]["pretrained"]["splits"]["val"]["top1"])
    assert "| tp |" in done.stdout
