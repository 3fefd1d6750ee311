"""report: the paper's tables and figures from fake finished runs (written per SPEC)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import write_fake_run
from matplotlib import image as mpimg

from mlssp_jax import evaluate, metrics, report, report_figures, report_tables
from mlssp_jax.cli import run_command

ALPHA_SKILL = {0.3: 0.6, 0.4: 0.7, 0.5: 0.95, 0.6: 0.65, 0.7: 0.5}  # 0.5 is best
BASELINE_SKILL = {"ynet": 0.8, "he": 0.7, "unet3d": 0.75, "cnn": 0.55}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Five MLSSP alphas and the four baselines at alpha 0.5 (summaries pooled), and a report."""
    root = tmp_path_factory.mktemp("experiment")
    dirs = []
    for seed, (alpha, skill) in enumerate(ALPHA_SKILL.items()):
        dirs.append(root / f"mlssp_alpha{alpha}")
        write_fake_run(dirs[-1], "mlssp", alpha, skill, seed=seed)
    for seed, (model, skill) in enumerate(BASELINE_SKILL.items(), start=10):
        dirs.append(root / f"{model}_alpha0.5")
        write_fake_run(dirs[-1], model, 0.5, skill, seed=seed)
    for d in dirs:
        assert evaluate.main(["--workdir", str(d), "--bootstrap", "100"]) == 0
    assert report.main([*map(str, dirs), "--out", str(root / "report")]) == 0
    return dirs, root / "report"


def _summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def _section(text, title):
    """The lines of the markdown table under the heading starting with ``title``."""
    block = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return [line for line in block.splitlines() if line.startswith("|")]


def test_tables_have_the_papers_layout(experiment):
    dirs, out = experiment
    text = (out / "report.md").read_text()
    table1 = _section(text, "Table 1")
    assert len(table1) == 2 + 5 and "DSC (paper)" in table1[0]
    row = next(line for line in table1 if line.startswith("| 0.3 |"))
    seg = _summary(dirs[0])["segmentation"]
    low, high = seg["ci95"]["dsc"]
    assert f"{seg['dsc']:.3f} [{low:.3f}, {high:.3f}]" in row and "*0.814*" in row
    table2 = _section(text, "Table 2")
    assert len(table2) == 2 + 2 * 5  # each alpha by both protocols
    cls = _summary(dirs[1])["classification"]
    voi, whole = (line for line in table2 if line.startswith("| 0.4 |"))
    assert f"{100 * cls['accuracy']:.2f} [" in voi and "*95.00*" in voi and "(paper)" in voi
    whole_cls = _summary(dirs[1])["whole_scan"]["classification"]
    low, high = whole_cls["ci95"]["auc"]
    assert f"| whole scan | {100 * whole_cls['accuracy']:.2f} [" in whole
    assert whole.rstrip(" |").endswith(f"{whole_cls['auc']:.3f} [{low:.3f}, {high:.3f}]")
    table3 = _section(text, "Table 3")
    assert [line.split("|")[1].strip() + ", " + line.split("|")[3].strip()
            for line in table3[2:]] == [
        "MLSSP, VOI on the true lesion (paper)", "Y-Net, VOI on the true lesion (paper)",
        "He et al., VOI on the true lesion (paper)", "CNN, VOI on the true lesion (paper)",
        "MLSSP, whole scan", "Y-Net, whole scan", "He et al., whole scan",
        "descriptors on MLSSP's lesion, whole scan", "descriptors on Y-Net's lesion, whole scan",
        "descriptors on He et al.'s lesion, whole scan",
        "descriptors on 3D U-Net's lesion, whole scan"]
    assert "Zhao et al. 2022" in text and "not comparable" in text


def test_best_alpha_picks_the_runs_at_that_alpha(experiment):
    dirs, out = experiment
    text = (out / "report.md").read_text()
    assert "Best MLSSP alpha: **0.5**" in text
    mlssp_row = next(line for line in _section(text, "Table 3") if line.startswith("| MLSSP"))
    auc = _summary(dirs[2])["classification"]["auc"]  # the alpha-0.5 run
    assert mlssp_row.split("|")[2].strip() == "0.5" and f"{auc:.3f} [" in mlssp_row


def test_delong_p_values_against_mlssp(experiment):
    dirs, out = experiment
    text = (out / "report.md").read_text()
    ynet_row = next(line for line in _section(text, "Table 3") if line.startswith("| Y-Net"))
    rows_a = _summary(dirs[5])["classification"]["per_subject"]
    rows_b = {r["subject_id"]: r for r in _summary(dirs[2])["classification"]["per_subject"]}
    labels = np.array([r["label"] for r in rows_a])
    _, _, p = metrics.delong_test(labels, np.array([r["prob"] for r in rows_a]),
                                  np.array([rows_b[r["subject_id"]]["prob"] for r in rows_a]))
    assert ynet_row.rstrip(" |").endswith(f"{p:.3f} | MLSSP, VOI on the true lesion (paper)")
    mlssp_row = next(line for line in _section(text, "Table 3") if line.startswith("| MLSSP"))
    assert mlssp_row.rstrip(" |").endswith("- | -")


def test_descriptor_rows_are_tested_against_their_own_runs_cnn(experiment):
    dirs, out = experiment
    table3 = _section((out / "report.md").read_text(), "Table 3")
    whole = _summary(dirs[2])["whole_scan"]  # MLSSP at alpha 0.5
    own = {r["subject_id"]: r for r in whole["classification"]["per_subject"]}
    rows = whole["descriptor_classification"]["per_subject"]
    _, _, p = metrics.delong_test(np.array([r["label"] for r in rows]),
                                  np.array([r["prob"] for r in rows]),
                                  np.array([own[r["subject_id"]]["prob"] for r in rows]))
    row = next(line for line in table3 if line.startswith("| descriptors on MLSSP's lesion"))
    auc = whole["descriptor_classification"]["auc"]
    assert f"| {auc:.3f} [" in row
    assert row.rstrip(" |").endswith(f"{p:.3f} | MLSSP's CNN branch, whole scan")
    unet = next(line for line in table3 if line.startswith("| descriptors on 3D U-Net's"))
    assert unet.rstrip(" |").endswith("- | -")  # no CNN branch to test against


def test_calibration_table_and_reliability_diagram(experiment):
    dirs, out = experiment
    text = (out / "report.md").read_text()
    table = _section(text, "Calibration")
    mlssp = [line for line in table if line.startswith("| MLSSP | 0.5 |")]
    assert len(mlssp) == 3  # the CNN by both protocols, the descriptors
    block = _summary(dirs[2])["whole_scan"]["descriptor_classification"]
    low, high = block["ci95"]["brier"]
    assert f"| {block['brier']:.3f} [{low:.3f}, {high:.3f}] |" in mlssp[2]
    reference = block["ece_if_calibrated"]
    assert f"| {reference['median']:.3f} [{reference['range95'][0]:.3f}, " in mlssp[2]
    assert f"p {reference['p']:.2f} |" in mlssp[2]
    assert "![Reliability diagram (calibration)](reliability.png)" in text


def test_figures_are_written_and_linked(experiment):
    _, out = experiment
    text = (out / "report.md").read_text()
    names = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert sorted(names) == sorted(name for name, _ in report.FIGURES)
    for name in names:
        pixels = mpimg.imread(out / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05  # not blank


def test_report_pools_a_run_without_summary(tmp_path):
    write_fake_run(tmp_path / "cnn", model="cnn", alpha=0.4)
    assert report.main([str(tmp_path / "cnn"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| CNN | 0.4 |" in text
    assert (tmp_path / "r" / "fig6_roc_by_model.png").is_file()
    assert not (tmp_path / "r" / "fig4_dsc_by_model.png").exists()  # no segmentation model


def test_missing_run_dir_is_an_error(tmp_path, capsys):
    assert run_command(report.main, [str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "r").exists()


def test_experiment_sweeps_alphas_then_baselines_and_resumes(tmp_path, monkeypatch):
    """The whole experiment with the trainer replaced by one writing fake folds."""
    from helpers import write_fake_fold

    from mlssp_jax import experiment

    calls = []

    def fake_train(cfg, workdir, fold, resume):
        calls.append((cfg.model.name, cfg.train.alpha, fold))
        skill = 0.9 if cfg.train.alpha == 0.5 else 0.6
        write_fake_fold(workdir, cfg, fold, skill, np.random.default_rng(fold), epochs=2)

    monkeypatch.setattr(experiment.train_lib, "train_and_evaluate", fake_train)
    monkeypatch.setattr(experiment, "use_compilation_cache", lambda out: None)
    argv = ["--out", str(tmp_path / "exp"), "--alphas", "0.3,0.5", "--models", "ynet,cnn",
            "--set", "train.num_folds=2", "--bootstrap", "50"]
    assert experiment.main(argv) == 0
    assert calls == [("mlssp", 0.3, 0), ("mlssp", 0.3, 1), ("mlssp", 0.5, 0), ("mlssp", 0.5, 1),
                     ("ynet", 0.5, 0), ("ynet", 0.5, 1), ("cnn", 0.5, 0), ("cnn", 0.5, 1)]
    text = (tmp_path / "exp" / "report" / "report.md").read_text()
    assert "Best MLSSP alpha: **0.5**" in text and "| CNN | 0.5 |" in text
    (tmp_path / "exp" / "ynet_alpha0.5" / "fold_1" / "eval.json").unlink()
    calls.clear()
    monkeypatch.setattr(experiment.report, "write_report", lambda dirs, out: out / "report.md")
    assert experiment.main(argv) == 0
    assert calls == [("ynet", 0.5, 1)]
    assert run_command(experiment.main, argv + ["--models", "mlssp"]) == 2


def test_experiment_caches_compiled_programs_in_its_directory(tmp_path, monkeypatch):
    from mlssp_jax import experiment

    updates = []
    monkeypatch.setattr(experiment.jax.config, "update", lambda *a: updates.append(a))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    experiment.use_compilation_cache(tmp_path)
    assert updates == [("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))]
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    experiment.use_compilation_cache(tmp_path / "other")
    assert len(updates) == 1


def test_an_out_that_would_destroy_a_run_or_a_folder_is_refused(tmp_path, capsys):
    write_fake_run(tmp_path / "runs" / "cnn", model="cnn", alpha=0.4)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    before = sorted(tmp_path.rglob("*"))
    for out, why in ((tmp_path / "runs" / "cnn", "holds the run"),
                     (tmp_path / "runs", "holds the run"),
                     (tmp_path / "notes", "not a report folder")):
        assert run_command(report.main, [str(tmp_path / "runs" / "cnn"), "--out", str(out)]) == 2
        assert why in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


def test_both_protocols_side_by_side_whole_scan_first(experiment):
    dirs, out = experiment
    text = (out / "report.md").read_text()
    assert text.index("## Whole scan and lesion-centred VOI") < text.index("## Table 1")
    table = _section(text, "Whole scan and lesion-centred VOI")
    header = table[0]
    assert header.index("whole DSC") < header.index("VOI DSC")
    whole = _summary(dirs[0])["whole_scan"]["segmentation"]
    row = next(line for line in table if line.startswith(f"| {dirs[0].name} |"))
    assert f"{whole['dsc']:.3f} [" in row and f"({whole['median_false_positive_ml']:.2f})" in row
    assert f"{_summary(dirs[0])['segmentation']['dsc']:.3f} [" in row


def test_protocol_table_shows_the_signed_median_volume_error_on_the_scans_grids(tmp_path):
    whole = {"dsc_native": 0.9, "volume_error_native_ml": 2.0,
             "median_volume_error_native_ml": 1.5,
             "median_signed_volume_error_native_ml": -0.75, "ci95": {}}
    run = report_tables.Run(tmp_path / "r", "mlssp", 0.4,
                            {"whole_scan": {"segmentation": whole, "classification": None},
                             "segmentation": None, "classification": None})
    table = report_tables.table_protocols([run])
    assert "(1.50; signed -0.75)" in table[-1]
    older = report_tables.Run(tmp_path / "o", "mlssp", 0.4,
                              {"whole_scan": {"segmentation": {
                                  "median_volume_error_native_ml": 1.5, "ci95": {}}},
                               "segmentation": None, "classification": None})
    assert "(1.50)" in report_tables.table_protocols([older])[-1]


def test_training_curve_panels_of_one_model_on_two_cohorts_are_told_apart(tmp_path):
    def run(name, model="mlssp"):
        return report_tables.Run(tmp_path / name, model, 0.4, {})
    titles = report_figures.panel_titles([run("built_in"), run("shifted"), run("y", "ynet")])
    assert titles[0] != titles[1]
    assert titles[0].endswith("built_in") and titles[1].endswith("shifted")
    assert titles[2] == run("y", "ynet").title  # a title no other run shares stays as it is
