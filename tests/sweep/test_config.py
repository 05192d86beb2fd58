"""Config loading: every shipped config validates; errors name the file and the key."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.config import ConfigError, demo_config_path, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write_config(tmp_path, mutate) -> Path:
    raw = yaml.safe_load(demo_config_path().read_text())
    mutate(raw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.study.name
    assert config.evaluator.all_tasks()
    assert config.evaluator.objective_suite in config.evaluator.suite_tasks()


def test_suite_files_are_read_by_name_or_path(tmp_path):
    config = load_config(ROOT / "configs" / "mistral-7b-a100.yaml")
    suites = config.evaluator.suite_tasks()
    assert {"mmlu", "truthfulqa_mc1", "bbq", "gsm8k", "sweep_cnn_dailymail"} <= {t.name for t in suites["open"]}
    assert {"ethics_justice", "ethics_cm", "ethics_virtue", "ethics_deontology", "ethics_utilitarianism",
            "hendrycks_math"} <= {t.name for t in suites["heldout"]}
    assert config.evaluator.pick_by == "heldout" and config.evaluator.objective_suite == "open"
    mine = tmp_path / "mine.yaml"
    mine.write_text("tasks:\n  - {name: my_ethics, generator: micro_ethics, chance: 0.5}\n")
    other = load_config(None, [f"evaluator.suites.heldout.file={mine}", "evaluator.suites.heldout.tasks=[]"])
    assert [t.name for t in other.evaluator.suite_tasks()["heldout"]] == ["my_ethics"]
    missing = [f"evaluator.suites.heldout.file={tmp_path / 'none.yaml'}", "evaluator.suites.heldout.tasks=[]"]
    with pytest.raises(ConfigError, match="evaluator.suites.heldout.file: no suite file"):
        load_config(None, missing)


def test_embedded_demo_is_the_repo_demo():
    assert demo_config_path().read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    config = load_config(None)
    assert config.model.name_or_path == "sweep-demo/tiny-llama"
    assert {"trainer.learning_rate", "trainer.lora.r", "trainer.lora.alpha", "trainer.lora.dropout"} <= set(
        config.search_space
    )
    assert config.search_space["trainer.learning_rate"].log is True


def test_set_overrides_values_at_any_depth():
    config = load_config(None, ["trainer.lora.r=32", "study.n_trials=3", "data.sources.0.num_train=50",
                                "search_space.trainer.lora.dropout.high=0.3"])
    assert config.trainer.lora.r == 32
    assert config.study.n_trials == 3
    assert config.data.sources[0].num_train == 50
    assert config.search_space["trainer.lora.dropout"].high == 0.3


@pytest.mark.parametrize("mutate,key", [
    (lambda c: c["trainer"]["lora"].update(rank=4), "trainer.lora.rank"),
    (lambda c: c.update(extra_section={}), "extra_section"),
    (lambda c: c["data"]["sources"][0].update(colour="red"), "data.sources.0.colour"),
    (lambda c: c["trainer"].update(learning_rate=-1e-4), "trainer.learning_rate"),
    (lambda c: c.pop("model"), "model"),
    (lambda c: c["model"].pop("name_or_path"), "model.name_or_path"),
    (lambda c: c["trainer"].update(max_steps="many"), "trainer.max_steps"),
    (lambda c: c["search_space"]["trainer.learning_rate"].update(low=-1), "search_space.trainer.learning_rate"),
    (lambda c: c["search_space"].update({"trainer.nope": {"type": "float", "low": 0, "high": 1}}),
     "search_space.trainer.nope"),
    (lambda c: c["search_space"]["trainer.lora.r"].update(choices=[0, 8]), "search_space.trainer.lora.r"),
    (lambda c: c["evaluator"]["suites"]["open"]["tasks"][0].update(source="missing"),
     "evaluator.suites.open.tasks.0.source"),
])
def test_invalid_config_names_file_and_key(tmp_path, mutate, key):
    path = write_config(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}")
    assert "\n" not in message


@pytest.mark.parametrize("item,needle", [
    ("trainer.lora.rank=4", "trainer.lora.rank"),
    ("trainer.learning_rate=-1", "trainer.learning_rate"),
    ("no_equals_sign", "no_equals_sign"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("data.sources.7.name=x", "data.sources.7"),
])
def test_invalid_set_names_the_key(item, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [item])
    assert needle in str(info.value)


@pytest.mark.parametrize("name,problem", [
    ("../../etc/x", "must not contain a path separator"),
    ("/abs/study", "must not contain a path separator"),
    ("a\\\\b", "must not contain a path separator"),
    ("..", "must not start with a dot"),
    (".hidden", "must not start with a dot"),
    ("tab\\there", "must not contain control characters"),
    ("''", "must be a non-empty name"),
])
def test_a_study_name_is_data_never_a_path(name, problem):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f'study.name="{name}"' if "\\" in name else f"study.name={name}"])
    assert f"study.name: {problem}" in str(info.value)
    assert load_config(None, ["study.name=my study-2.1"]).study.name == "my study-2.1"


def test_roundtrip_through_plain_data():
    config = load_config(None)
    again = load_config(None)
    assert to_dict(config) == to_dict(again)


def _sweep(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _table_counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        return {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
    finally:
        con.close()


@pytest.mark.parametrize("args", [
    ["--set", "trainer.learning_rate=-0.001"],
    ["--set", "trainer.lora.bogus=1"],
    ["--set", "model.name_or_path=null"],
    ["--set", "broken"],
])
def test_start_with_invalid_config_writes_nothing(tmp_path, args):
    db = tmp_path / "studies.db"
    result = _sweep("start", "--storage", f"sqlite:///{db}", *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert not db.exists()


def test_invalid_config_leaves_an_existing_database_unchanged(tmp_path):
    db = tmp_path / "studies.db"
    con = sqlite3.connect(db)
    con.execute("create table keep (x integer)")
    con.execute("insert into keep values (1)")
    con.commit()
    con.close()
    before = _table_counts(db)
    bad = write_config(tmp_path, lambda c: c["trainer"]["lora"].update(rank=4))
    result = _sweep("start", "--config", str(bad), "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert result.returncode == 2 and "trainer.lora.rank" in result.stderr
    assert _table_counts(db) == before


def test_validate_command(tmp_path):
    ok = _sweep("validate", str(demo_config_path()), cwd=tmp_path)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = write_config(tmp_path, lambda c: c["trainer"].update(learning_rate=-1))
    result = _sweep("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.learning_rate" in result.stderr and str(bad) in result.stderr


def test_readme_documents_every_config_key():
    from sweep.config import reference_markdown

    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "README's config reference is stale: paste reference_markdown()"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest'
    assert test_command in readme.split("\n## ")[0]  # among the set-up commands at the top
    assert test_command in (ROOT / ".ci" / "run").read_text()
