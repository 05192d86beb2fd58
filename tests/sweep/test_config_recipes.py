"""The shipped configs: every file in configs/ validates, and each recipe's enqueued trial 0 runs on the demo base
with exactly the recipe's parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SWEEP_CONFIGS = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "recipes").glob("*.yaml"))
RECIPES = sorted((CONFIGS / "recipes").glob("*.yaml"))
SUITES = sorted((CONFIGS / "suites").glob("*.yaml"))

# What each recipe's trial 0 changes to run on the CPU demo base, and nothing else: the recipe's searched
# parameters (its `enqueue`) and its other settings stay as written.
DEMO_GENERATORS = ("digits", "micro_mc", "micro_gen", "micro_sum")


def demo_overrides(recipe: dict, work: Path) -> list[str]:
    """The overrides of a recipe's demo run, each one listed:

    - model: the demo base (`sweep-demo/tiny-llama`), without hub code;
    - data.sources: each source replaced by a generated one of the same name (so the mix keeps its names and
      weights), 400 examples each;
    - lengths: data.max_seq_length 96, trainer.pack_length 320 (the demo base's context is 512 tokens);
    - steps: trainer.max_steps 4, no rungs (pruner none);
    - target modules: all-linear (the recipes' c_attn/c_proj are Qwen's names; the demo base is a Llama);
    - evaluator: the offline micro suites, generating at most 24 tokens;
    - one slot, artifacts under the test's directory.
    """
    sources = [
        {"name": s["name"], "kind": "synthetic", "generator": DEMO_GENERATORS[i % len(DEMO_GENERATORS)],
         "num_train": 400, "num_eval": 24}
        for i, s in enumerate(recipe["data"]["sources"])
    ]
    return [
        "model.name_or_path=sweep-demo/tiny-llama",
        "model.trust_remote_code=false",
        f"data.sources={json.dumps(sources)}",
        "data.max_seq_length=96",
        "trainer.pack_length=320",
        "trainer.max_steps=4",
        "study.pruner=none",
        "trainer.lora.target_modules=all-linear",
        "evaluator.suites={open: {file: micro_open}, heldout: {file: micro_heldout}}",
        "evaluator.generation={max_new_tokens: 24}",
        "evaluator.batch_size=32",
        "orchestration.concurrency=1",
        f"orchestration.artifacts_dir={work / 'sweep-runs'}",
    ]


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_validates(path, cli):
    out = cli("validate", str(path), "--file-only")
    assert "valid" in out


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_every_suite_file_reads(path):
    from sweep.config import TaskConfig, from_dict

    raw = yaml.safe_load(path.read_text())
    tasks = [from_dict(TaskConfig, t, source=str(path), prefix=f"tasks.{i}") for i, t in enumerate(raw["tasks"])]
    assert tasks


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_says_where_it_comes_from_and_how_to_run_it(path):
    from sweep.config import load_config

    header = path.read_text().split("\nstudy:")[0]
    assert header.startswith("# Recipe: "), "the first line names the recipe and where it comes from"
    assert f"sweep start --config configs/recipes/{path.name} --gpu " in header
    config = load_config(path)
    assert config.enqueue, "a recipe's known settings run first"
    for params in config.enqueue:  # every enqueued key is searched, so the study searches around the recipe
        assert set(params) <= set(config.search_space)


def test_the_recipes_are_the_known_ones():
    from sweep.config import load_config

    by_name = {p.stem: load_config(p) for p in RECIPES}
    winner = by_name["mistral-7b-4090-winner"]
    assert winner.model.name_or_path == "mistralai/Mistral-7B-v0.1" and winner.trainer.mode == "qlora"
    assert winner.enqueue[0] == {"trainer.learning_rate": 2e-5, "trainer.lora.r": 128, "trainer.lora.alpha": 256,
                                 "trainer.neftune_alpha": 5.0}
    assert (winner.trainer.epochs, winner.trainer.pack_length, winner.trainer.lr_scheduler,
            winner.trainer.warmup_steps) == (3, 8192, "cosine", 100)
    qwen = by_name["qwen-14b-a100-winner"]
    assert qwen.model.name_or_path == "Qwen/Qwen-14B" and qwen.trainer.epochs == 1
    assert qwen.trainer.lora.target_modules == ["c_attn", "c_proj"]
    assert qwen.enqueue[0] == {"trainer.mode": "lora", "trainer.learning_rate": 5e-5, "trainer.lora.r": 8}
    r256 = by_name["mistral-7b-r256-platypus"]
    assert {s.dataset for s in r256.data.sources} == {"garage-bAInd/Open-Platypus", "OpenAssistant/oasst1",
                                                      "GAIR/lima"}
    assert r256.enqueue[0]["trainer.lora.r"] == 256 and r256.enqueue[0]["trainer.lora.alpha"] == 512
    llama = by_name["llama-2-7b-lima-qlora"]
    assert llama.data.template == "llama2" and llama.trainer.epochs == 5
    assert {k: llama.enqueue[0][k] for k in ("trainer.lora.r", "trainer.lora.alpha", "trainer.lora.dropout")} == {
        "trainer.lora.r": 64, "trainer.lora.alpha": 16, "trainer.lora.dropout": 0.05}
    njust = by_name["njust-a100-mix"]
    assert njust.data.max_seq_length == 2048
    mix = {k.removeprefix("data.mix."): v for k, v in njust.enqueue[0].items() if k.startswith("data.mix.")}
    assert {k: mix[k] for k in ("dolly", "cnn", "bbq", "mmlu_aux", "sciq")} == {
        "dolly": 8000, "cnn": 4000, "bbq": 8000, "mmlu_aux": 19000, "sciq": 6000}
    datasets = {s.name: s.dataset for s in njust.data.sources}
    assert datasets["bbq"] == "oskarvanderwal/bbq" and datasets["sciq"] == "allenai/sciq"  # lm-eval's own


def test_njust_recipe_trains_on_a_dataset_it_is_scored_on():
    """The contamination check names BBQ for the NJUST mix, offline, from the configs alone."""
    from sweep.config import load_config
    from sweep.contamination import shared_datasets

    rows = shared_datasets(load_config(CONFIGS / "recipes" / "njust-a100-mix.yaml"))
    bbq = [r for r in rows if r.source == "bbq" and r.task == "bbq"]
    assert bbq and bbq[0].trained_split == "test" and "test" in (bbq[0].scored_split or ""), rows


@pytest.mark.integration
@pytest.mark.slow  # five starts; `.ci/run` runs it (`python -m pytest -m slow`)
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trial_0_runs_the_recipe_on_the_demo_base(path, tmp_path, ray_session, monkeypatch):
    import optuna

    from sweep.cli import main

    recipe = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    args = ["start", "--config", str(path), "--trials", "1", "--storage", storage]
    for item in demo_overrides(recipe, tmp_path):
        args += ["--set", item]
    assert main(args) == 0
    study = optuna.load_study(study_name=recipe["study"]["name"], storage=storage)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    written = recipe["enqueue"][0]
    assert {k: trial.params[k] for k in written} == pytest.approx(written), "trial 0 ran the recipe's values"
    # ...and trained with them: its resolved config, saved beside its adapter, has them in place.
    hyperparameters = yaml.safe_load((Path(trial.user_attrs["adapter_dir"]) / "hyperparameters.yaml").read_text())
    for key, value in written.items():
        node = hyperparameters
        section, _, rest = key.partition(".")
        parts = [section, *(rest.split(".") if not rest.startswith("mix.") else ["mix", rest[4:]])]
        for part in parts:
            node = node[part]
        assert node == pytest.approx(value), key
    mode = written.get("trainer.mode", recipe["trainer"].get("mode", "qlora"))
    assert trial.user_attrs["mode"] == mode
    assert re.fullmatch(r"nf4|fp4|int8|16-bit", trial.user_attrs["quantization"])
