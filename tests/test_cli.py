"""The `homefeed` command line: fast help, clear errors, and the demo's report contract."""

from __future__ import annotations

import json
import subprocess
import sys

from tools.cli import main


def test_help_answers_without_importing_feast():
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "simulate" in out.stdout and "dataset" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, tools.cli; print('feast' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"


def test_bad_preset_is_a_clear_error(capsys, home):
    assert main(["simulate", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(capsys, home):
    assert main(["simulate", "--preset", "tiny", "--set", "users"]) == 2
    assert "--set expects key=value, got 'users'" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(capsys, home):
    assert main(["dataset", "--dataset", "nope"]) == 2
    assert "dataset 'nope' not found" in capsys.readouterr().err


def test_demo_writes_the_data_report(home, capsys):
    assert main(["demo", "--preset", "tiny", "--no-train"]) == 0
    report = json.loads((home.reports / "data.json").read_text())
    assert report["tables"]["impressions"]["rows"] > 0
    assert set(report["label_rates"]) == {"purchase_7d", "click", "add_to_cart"}
    assert set(report["split"]) == {"train_start", "train_end", "valid_end", "test_end"}
    assert len(report["position_curve"]["estimated"]) == len(report["position_curve"]["true"]) == 10
    for step in (
        "simulate",
        "validate",
        "features_build",
        "features_apply",
        "features_materialize",
        "dataset",
    ):
        assert report["seconds"][step] >= 0, step
    assert "position  estimated  true" in capsys.readouterr().out


def test_ingest_of_corrupt_logs_names_table_column_rows_and_writes_nothing(
    tiny_sim, home, tmp_path, capsys
):
    from contract import columns as C
    from training.tables import write_tables

    tables = {k: v.copy() for k, v in tiny_sim.tables.items() if k in C.ALL_TABLES}
    tables[C.ITEMS].loc[[3, 8], C.PRICE] = -1.0
    tables[C.ITEMS].loc[[3, 8], C.LIST_PRICE] = 5.0
    tables[C.PURCHASES] = tables[C.PURCHASES].assign(
        **{
            C.IMPRESSION_ID: tables[C.PURCHASES][C.IMPRESSION_ID].where(
                tables[C.PURCHASES].index != 0, 10**12
            )
        }
    )
    write_tables(tables, tmp_path / "logs")

    assert (
        main(
            [
                "ingest",
                "--source",
                "generic",
                "--path",
                str(tmp_path / "logs"),
                "--dataset",
                "corrupt",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "validation failed: 2 violations" in err
    assert "items.price: non_negative — 2 rows violate" in err
    assert "purchases.impression_id: foreign_key — 1 row violates" in err
    assert not home.raw("corrupt").exists()


def test_cli_stage_names_match_the_trainer():
    from tools.cli import _STAGES
    from training.train import STAGES

    assert _STAGES == STAGES


def test_rollout_without_a_mesh_is_a_clear_error(capsys, home):
    assert main(["rollout", "status"]) == 2
    assert "no mesh is running" in capsys.readouterr().err


def test_rollout_refuses_bad_arguments_before_calling_anyone(capsys):
    import pytest

    for argv in (["rollout", "start"], ["rollout", "start", "--version", "x"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "--version" in capsys.readouterr().err
