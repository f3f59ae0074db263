"""The report command: every number of the table against values computed here from hand-written results.json
files (seeds of one variant, a random init with both sections, imported weights with and without a label), the
paper's numbers in the right columns, the missing markers, and the one-line errors of a user's mistakes."""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from geo_contrast import report

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Column indices of report.COLUMNS, named so each check says what it compares.
F1_FROZEN, F1_FINETUNED, TOP1_FROZEN, TOP1_FINETUNED, LOCATION_FROZEN = range(5)


def _split(top1, f1, location_top1):
    return {"top1": top1, "top5": min(1.0, top1 + 0.2), "macro_f1": f1, "location_top1": location_top1,
            "location_top5": 1.0, "location_macro_f1": location_top1 - 0.01, "per_class_f1": {"airport": f1},
            "num_images": 100, "num_locations": 40}


def _entry(init, variant, val, test=None):
    splits = {"val": _split(*val)}
    if test is not None:
        splits["test"] = _split(*test)
    return {"init": init, "variant": variant, "backbone": "ResNet-50", "dataset": "fmow", "selected_epoch": 3,
            "num_epochs": 5, "selection": "best val top-1", "splits": splits}


# (top1, macro_f1, location_top1) of the val split of each run, fractions.
TP_SEEDS = {"tp_s0": (0.61, 0.55, 0.70), "tp_s1": (0.63, 0.58, 0.71), "tp_s2": (0.66, 0.56, 0.75)}
TP_FINETUNED = (0.70, 0.65, 0.78)  # tp_s0 only.
RANDOM_FROZEN, RANDOM_FINETUNED = (0.20, 0.10, 0.25), (0.67, 0.62, 0.72)
IN1K_FROZEN, IN1K_FINETUNED = (0.40, 0.33, 0.45), (0.68, 0.63, 0.74)
GASSL_FROZEN = (0.64, 0.60, 0.73)


def _results_by_workdir():
    """{workdir name: results.json content} of the test's runs."""
    runs = {}
    for name, val in TP_SEEDS.items():
        runs[name] = {"linear_eval": {"pretrained": _entry("pretrained", "tp", val, test=(0.5, 0.5, 0.5))}}
    runs["tp_s0"]["finetune"] = {"pretrained": _entry("pretrained", "tp", TP_FINETUNED)}
    runs["random"] = {"linear_eval": {"random": _entry("random", None, RANDOM_FROZEN)},
                      "finetune": {"random": _entry("random", None, RANDOM_FINETUNED)}}
    in1k = "/weights/in1k.safetensors"
    gassl = "/weights/gassl.safetensors"
    runs["imported"] = {
        "linear_eval": {in1k: _entry(in1k, None, IN1K_FROZEN), gassl: _entry(gassl, None, GASSL_FROZEN)},
        "finetune": {in1k: _entry(in1k, None, IN1K_FINETUNED)},
    }
    return runs


LABELS = ["in1k=SUPERVISED, imagenet INIT"]  # Any case names the paper's row.


@pytest.fixture
def workdirs(tmp_path):
    """The test's runs as workdirs with results.json, in a fixed order."""
    paths = []
    for name, content in _results_by_workdir().items():
        path = tmp_path / name
        path.mkdir()
        (path / "results.json").write_text(json.dumps(content))
        paths.append(str(path))
    return paths


def _table(split="val"):
    runs = list(_results_by_workdir().items())
    return report.aggregate(runs, report.parse_labels(LABELS), split)


def _row(table, name):
    (row,) = [r for r in table["rows"] if r["row"] == name]
    return row


def _percent(values):
    return [100 * v for v in values]


def test_seeds_are_averaged_with_the_sample_sd_and_compared_with_the_paper():
    row = _row(_table(), "MoCo-v2+TP")
    paper = report.PAPER["MoCo-v2+TP"]
    for column, index in ((F1_FROZEN, 1), (TOP1_FROZEN, 0), (LOCATION_FROZEN, 2)):
        values = _percent(seed[index] for seed in TP_SEEDS.values())
        mean = sum(values) / 3
        cell = row["cells"][column]
        assert cell["n"] == 3
        assert cell["mean"] == pytest.approx(mean)
        assert cell["sd"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5)
        assert cell["paper"] == paper[column]
        if column != LOCATION_FROZEN:
            assert cell["difference"] == pytest.approx(mean - paper[column])
    assert row["cells"][LOCATION_FROZEN]["difference"] is None  # Table 2 has Geo+TP only.
    finetuned = row["cells"][F1_FINETUNED]
    assert (finetuned["n"], finetuned["sd"]) == (1, None)
    assert finetuned["mean"] == pytest.approx(100 * TP_FINETUNED[1])
    assert finetuned["difference"] == pytest.approx(100 * TP_FINETUNED[1] - paper[F1_FINETUNED])
    assert row["sources"] == {"linear_eval": list(TP_SEEDS), "finetune": ["tp_s0"]}


def test_the_paper_constant_holds_table_1_frozen_then_fine_tuned_and_table_2():
    # Typed again from the paper, so a swap of its columns in the module shows.
    assert report.PAPER["MoCo-v2+TP"] == (64.53, 67.34, 68.32, 71.55, None)
    assert report.PAPER["MoCo-v2+Geo+TP"] == (63.13, 66.56, 66.33, 70.60, 72.76)
    assert report.PAPER["supervised, ImageNet init"] == (None, 64.72, None, 69.07, None)
    assert list(report.PAPER)[:2] == ["supervised, ImageNet init", "supervised, scratch"]
    assert len(report.PAPER) == 8
    assert [title for _, _, title in report.COLUMNS] == [
        "F1 frozen", "F1 fine-tuned", "top-1 frozen", "top-1 fine-tuned", "location top-1 frozen"]


def test_random_init_fine_tuned_is_supervised_scratch_and_frozen_an_extra_row():
    table = _table()
    scratch = _row(table, "supervised, scratch")
    assert scratch["in_paper"]
    assert scratch["cells"][TOP1_FINETUNED]["mean"] == pytest.approx(100 * RANDOM_FINETUNED[0])
    assert scratch["cells"][TOP1_FINETUNED]["difference"] == pytest.approx(100 * RANDOM_FINETUNED[0] - 69.05)
    assert scratch["cells"][TOP1_FROZEN]["mean"] is None  # The frozen random probe is not this row.
    floor = _row(table, "random init (frozen floor)")
    assert not floor["in_paper"]
    assert floor["cells"][F1_FROZEN]["mean"] == pytest.approx(100 * RANDOM_FROZEN[1])
    assert [cell["paper"] for cell in floor["cells"]] == [None] * 5
    assert floor["cells"][F1_FINETUNED]["mean"] is None


def test_imported_weights_go_to_the_labelled_row_or_their_own():
    table = _table()
    in1k = _row(table, "supervised, ImageNet init")
    assert in1k["cells"][F1_FINETUNED]["mean"] == pytest.approx(100 * IN1K_FINETUNED[1])
    assert in1k["cells"][F1_FINETUNED]["difference"] == pytest.approx(100 * IN1K_FINETUNED[1] - 64.72)
    assert in1k["cells"][F1_FROZEN]["mean"] == pytest.approx(100 * IN1K_FROZEN[1])
    assert in1k["cells"][F1_FROZEN]["difference"] is None  # The paper has no frozen number for it.
    assert in1k["sources"]["finetune"] == ["imported (/weights/in1k.safetensors)"]
    gassl = _row(table, "imported: gassl")
    assert not gassl["in_paper"] and gassl["cells"][TOP1_FROZEN]["mean"] == pytest.approx(100 * GASSL_FROZEN[0])
    assert table["unused_labels"] == []


def test_labels_match_paper_rows_in_any_case_or_name_new_rows():
    labels = report.parse_labels(["in1k=supervised, IMAGENET init", "gassl.safetensors = MoCo-v2+Geo+TP (authors)",
                                  "moco_in1k=moco-v2 PRETRAINED on imagenet"])
    assert labels == {"in1k": "supervised, ImageNet init", "gassl": "MoCo-v2+Geo+TP (authors)",
                      "moco_in1k": "MoCo-v2 pretrained on ImageNet"}
    for bad in ["in1k", "=MoCo-v2", "in1k="]:
        with pytest.raises(report.ReportError, match="STEM=ROW"):
            report.parse_labels([bad])
    with pytest.raises(report.ReportError, match="two rows"):
        report.parse_labels(["a=MoCo-v2", "a=MoCo-v2+TP"])


def test_rows_in_the_paper_order_then_new_ones_and_missing_marked():
    table = _table()
    names = [row["row"] for row in table["rows"]]
    assert names == list(report.PAPER) + ["imported: gassl", "random init (frozen floor)"]
    geo = _row(table, "MoCo-v2+Geo")
    assert all(cell["mean"] is None and cell["n"] == 0 for cell in geo["cells"])
    markdown = report.render_markdown(table)
    (line,) = [line for line in markdown.splitlines() if line.startswith("| MoCo-v2+Geo |")]
    assert line == "| MoCo-v2+Geo | missing | 61.60 | - | missing | 66.60 | - | missing | 64.07 | - | missing | " \
                   "69.04 | - | missing | - | - | 0 | 0 |"
    assert "- MoCo-v2+Geo: none" in markdown


def test_the_markdown_shows_mean_sd_differences_and_sources():
    markdown = report.render_markdown(_table())
    lines = markdown.splitlines()
    assert lines[0].startswith("Split val, 5 workdirs (dataset fmow; backbone ResNet-50). Values are percentages")
    f1 = _percent(seed[1] for seed in TP_SEEDS.values())
    top1 = _percent(seed[0] for seed in TP_SEEDS.values())
    location = _percent(seed[2] for seed in TP_SEEDS.values())
    expected = ["MoCo-v2+TP"]
    for values, paper in ((f1, 64.53), ([100 * TP_FINETUNED[1]], 67.34), (top1, 68.32),
                          ([100 * TP_FINETUNED[0]], 71.55)):
        mean = statistics.mean(values)
        ours = f"{mean:.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
        expected += [ours, f"{paper:.2f}", f"{mean - paper:+.2f}"]
    expected += [f"{statistics.mean(location):.2f} ± {statistics.stdev(location):.2f}", "-", "-", "3", "1"]
    assert "| " + " | ".join(expected) + " |" in lines
    assert "- MoCo-v2+TP: frozen: tp_s0, tp_s1, tp_s2; fine-tuned: tp_s0" in lines
    assert "- supervised, ImageNet init: frozen: imported (/weights/in1k.safetensors); fine-tuned: imported " \
           "(/weights/in1k.safetensors)" in lines


def test_the_test_split_counts_only_the_runs_that_have_it():
    row = _row(_table("test"), "MoCo-v2+TP")
    assert row["cells"][TOP1_FROZEN]["mean"] == pytest.approx(50.0)
    assert row["cells"][TOP1_FROZEN]["sd"] == pytest.approx(0.0)
    assert row["cells"][TOP1_FINETUNED]["mean"] is None  # Fine-tuning evaluated val only.


def test_main_writes_markdown_and_json_and_counts_a_repeated_workdir_once(workdirs, tmp_path, capsys):
    out, out_json = tmp_path / "table.md", tmp_path / "table.json"
    report.main(workdirs + [workdirs[0] + "/", "--label", LABELS[0], "--out", str(out), "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert printed == out.read_text(encoding="utf-8")
    assert printed.startswith("Split val, 5 workdirs")
    table = json.loads(out_json.read_text())
    assert table["workdirs"] == workdirs
    row = _row(table, "MoCo-v2+TP")
    assert row["cells"][TOP1_FROZEN]["n"] == 3
    top1 = statistics.mean(_percent(seed[0] for seed in TP_SEEDS.values()))
    assert row["cells"][TOP1_FROZEN]["mean"] == pytest.approx(top1)


def test_an_unused_label_is_warned_about(workdirs, capsys):
    report.main(workdirs + ["--label", "in1k_typo=supervised, ImageNet init"])
    assert "warning: --label in1k_typo=... matches no imported" in capsys.readouterr().err


def _run(*args):
    return subprocess.run([sys.executable, "-m", "geo_contrast.report", *args], capture_output=True, text=True,
                          cwd=ROOT, check=False)


def test_user_errors_are_one_line_and_exit_1(workdirs, tmp_path):
    no_results = tmp_path / "pretrained_only"
    no_results.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    cases = {
        (str(no_results),): f"{no_results} has no results.json: its evaluation stages",
        (str(broken),): "results.json is not valid JSON",
        (str(tmp_path / "absent"),): "is not a directory",
        (workdirs[0], "--label", "in1k"): "is not STEM=ROW",
        (): "the following arguments are required: WORKDIR",
        (workdirs[0], "--out", str(tmp_path / "no_such_dir" / "t.md")): "cannot write --out=",
        (workdirs[0], "--split", "train"): "invalid choice",
    }
    for args, message in cases.items():
        result = _run(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_the_command_imports_neither_jax_nor_tensorflow(workdirs):
    code = ("import sys\nfrom geo_contrast import report\n"
            f"report.main({workdirs!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'orbax', "
            "'tensorflow', 'tensorflow_datasets')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.stdout.strip().splitlines()[-1] == "[]"
