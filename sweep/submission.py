"""What an export adds to a trial's adapter: the tokenizer, a model card, and a merged 16-bit model.

Two merges (`sweep export --merge [dequantized|original]`):

- `dequantized`: the adapter added into the bf16 dequantization of the 4-bit
  weights it was trained and scored on (`evaluator.fast.dense_base` computes
  them as bitsandbytes does in every forward pass), so the merged model is the
  model the sweep scored, up to bf16 rounding;
- `original`: the adapter merged into the base's original 16-bit weights, as
  peft's `merge_and_unload` does; a slightly different function, since the
  adapter was trained against the 4-bit weights.

Neither merges into 4-bit weights (peft would quantize the sum again). The
merged model goes to its own directory: transformers, given a folder that holds
both a model and an `adapter_config.json`, would apply the adapter once more.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml

MERGE_BASES = ("dequantized", "original")
BASE_EXPORT_FILE = "base_model.json"
"""What an export of the untuned base holds instead of an adapter: the base's id, revision and how it was scored."""
# What `sweep serve` needs (its import path loads none of optuna, ray, SQLAlchemy or lm-eval): the versions an
# export was made with, pinned by `sweep submission`.
SERVING_PACKAGES = (
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "huggingface-hub",
    "numpy", "pyyaml", "fastapi", "starlette", "uvicorn", "pydantic", "sentencepiece", "protobuf",
)


def package_versions() -> dict[str, Any]:
    """The installed versions of `SERVING_PACKAGES` (those installed), with Python's."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in SERVING_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "packages": found}


def model_config_of(hyperparameters: dict):
    """The trial's `ModelConfig` (its base and quantization) from its hyperparameters.yaml."""
    from sweep.config import from_dict
    from trainer.config import ModelConfig

    return from_dict(ModelConfig, hyperparameters.get("model") or {}, "hyperparameters.yaml", "model")


def merged_model(adapter_dir: str | Path, model_config, base: str = "dequantized", device: Optional[str] = None,
                 mode: str = "qlora"):
    """The adapter merged into a plain (unquantized) bf16 copy of its base: a transformers model without peft.

    Args:
        adapter_dir: the trial's adapter (adapter_config.json, adapter_model.safetensors).
        model_config: the trial's base model and quantization (`model_config_of`).
        base: `dequantized` (the 4-bit weights the adapter was trained and scored on) or `original` (the
            base's own 16-bit weights).
        device: where the merge runs; default: a GPU when there is one. It holds the bf16 base, and for
            `dequantized` the 4-bit one beside it.
        mode: the trial's `trainer.mode`. An adapter trained on the 16-bit base (`lora`) merges into it
            exactly: both merges are peft's. One trained on an int8 base merges into its int8 weights scaled
            back (`dequantized`) or the original ones.
    """
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.demo_base import resolve_model_path
    from trainer.model import default_device, load_base_model

    if base not in MERGE_BASES:
        raise ValueError(f"--merge: expected one of {', '.join(MERGE_BASES)}, got {base!r}")
    device = device or default_device()
    plain = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_config.name_or_path), revision=model_config.revision, dtype=torch.bfloat16,
        device_map={"": device}, trust_remote_code=model_config.trust_remote_code,
    )
    if base == "original" or mode == "lora":
        merged = peft.PeftModel.from_pretrained(plain, str(adapter_dir)).merge_and_unload()
        merged.config.use_cache = True
        return merged.eval()

    from evaluator.fast import _dense_weight, _mergeable, quantized_linears
    from trainer.model import unwrap_peft

    quantized = peft.PeftModel.from_pretrained(
        load_base_model(model_config, device, attn_implementation="sdpa", mode=mode), str(adapter_dir)
    )
    core = unwrap_peft(quantized)
    paths = {id(module): name for name, module in core.named_modules()}
    int8 = model_config.quant_type == "int8"
    dense_weight = _int8_dense_weight if int8 else _dense_weight
    with torch.no_grad():
        # Layer by layer, each quantized weight's dequantization with its LoRA delta added goes into the bf16
        # copy's weight of the same name: at most one dense layer is held beside the two models.
        for parent, attribute, layer in quantized_linears(core, bits=8 if int8 else 4):
            lora = parent if attribute == "base_layer" else None
            if lora is not None and not _mergeable(lora):
                raise ValueError("--merge dequantized: a DoRA adapter has no dense delta to add to the 4-bit "
                                 "weights; use --merge original")
            path = paths[id(lora)] if lora is not None else f"{paths[id(parent)]}.{attribute}".lstrip(".")
            target = plain.get_submodule(path)
            target.weight.copy_(dense_weight(layer, lora).to(torch.bfloat16))
    del quantized, core
    plain.config.use_cache = True
    return plain.eval()


def _int8_dense_weight(layer, lora):
    """An 8-bit layer's weight scaled back to float32 (its int8 rows times their absmax / 127), with the LoRA
    layer's delta added when one is given."""
    import torch

    from evaluator.fast import with_lora_delta

    weight = layer.weight
    codes = weight.CB if getattr(weight, "CB", None) is not None else weight.data
    return with_lora_delta(codes.to(torch.float32) * weight.SCB.to(torch.float32)[:, None] / 127, lora)


def model_card(status: dict[str, Any], trial: dict[str, Any], hyperparameters: dict,
               merge: Optional[str] = None) -> str:
    """The export's README.md: a Hugging Face model card (YAML front matter, then what the sweep knows)."""
    from trainer.model import trained_mode

    model = hyperparameters.get("model") or {}
    data = hyperparameters.get("data") or {}
    trainer = hyperparameters.get("trainer") or {}
    lora = trainer.get("lora") or {}
    evaluator = hyperparameters.get("evaluator") or {}
    base = model.get("name_or_path", "?")
    datasets = [s["dataset"] for s in data.get("sources", []) if s.get("kind") == "hub" and s.get("dataset")]
    front = {"base_model": base, "library_name": "peft", "tags": ["sweep", "qlora", "lora", "peft"]}
    if datasets:
        front["datasets"] = datasets
    record = trial.get("data") or {}
    baseline = status.get("baseline") or {}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {status['study']}: trial {trial['number']}", "",
        f"A LoRA adapter on `{base}`, trained and picked by a `sweep` study.", "",
        "## Base and adapter", "",
        f"- Base: `{base}`" + (f" (revision `{model['revision']}`)" if model.get("revision") else "")
        + f", {_loaded_as(model, trained_mode(hyperparameters))} for training and scoring.",
        f"- LoRA: r={lora.get('r')}, alpha={_num(lora.get('alpha'))}, dropout={_num(lora.get('dropout'))}, "
        f"target modules {lora.get('target_modules')}"
        + (", rsLoRA" if lora.get("use_rslora") else "") + (", DoRA" if lora.get("use_dora") else "") + ".",
        f"- Training: learning rate {_num(trainer.get('learning_rate'))}, {trial.get('train_steps')} steps "
        f"({trainer.get('lr_scheduler')} schedule), {trial.get('train_tokens')} tokens.",
    ]
    if merge:
        lines.append("- `merged/`: the adapter merged into the base's "
                     + ("bf16 dequantization of the 4-bit weights it was trained and scored on (the model the "
                        "sweep scored, up to bf16 rounding)" if merge == "dequantized" else
                        "original 16-bit weights (peft's merge; the adapter was trained against the 4-bit "
                        "weights, so this is a slightly different function)")
                     + "; it loads with `AutoModelForCausalLM` alone.")
    lines += ["", "## Data mix", "", "| source | kind | weight | examples used |", "|---|---|---|---|"]
    weights, selected = record.get("weights", {}), record.get("selected", {})
    for source in data.get("sources", []):
        name = source.get("name")
        kind = source.get("dataset") or source.get("path") or source.get("generator") or source.get("kind")
        lines.append(f"| {name} | {source.get('kind')}: {kind} | {weights.get(name, '')} | {selected.get(name, '')} |")
    lines += ["", f"{record.get('examples', '?')} examples drawn, {record.get('tokens', '?')} tokens an epoch "
              f"(the full run: {trainer.get('epochs')} epochs).", ""]
    lines += ["## Scores", "", "| suite | task | this model | baseline (untuned base) |", "|---|---|---|---|"]
    suites = evaluator.get("suites") or {"main": {"tasks": evaluator.get("tasks", [])}}
    for suite, spec in suites.items():
        for task in spec.get("tasks", []):
            name = task["name"]
            lines.append(f"| {suite} | {name} | {_num(trial['scores'].get(name))} | "
                         f"{_num((baseline.get('scores') or {}).get(name))} |")
        lines.append(f"| {suite} | **aggregate** | **{_num(trial['values'].get(suite))}** | "
                     f"{_num((baseline.get('values') or {}).get(suite))} |")
    optimize, pick_by, top_k = status.get("optimize"), status.get("pick_by"), status.get("top_k")
    pick = (status.get("pick") or {}).get("number")
    lines += ["", "## How it was picked", ""]
    if pick_by:
        lines.append(f"The study optimised `{optimize}`; the submission is the best trial on `{pick_by}` among "
                     f"the top {top_k} on `{optimize}`: trial {pick}."
                     + (" This is that trial." if pick == trial["number"] else f" This is trial {trial['number']}."))
    else:
        lines.append(f"The study optimised `{optimize}`; the submission is its best trial: trial {pick}.")
    correlation = status.get("rank_correlation")
    lines.append(f"Rank correlation of `{optimize}` and `{pick_by}` across complete trials: "
                 f"{_num(correlation) if correlation is not None else 'n/a (fewer than 3 trials)'}.")
    timeline = trial.get("timeline") or {}
    hours = trial.get("projected_full_run_hours")
    lines += [
        "", "## Cost", "",
        f"- Hardware: {timeline.get('device', 'not recorded')}.",
        f"- Training: {_num(trial.get('train_seconds'))} s at {_num(trial.get('tokens_per_second'))} tokens/s"
        + (f", peak memory {_num(trial.get('peak_memory_gib'))} GiB" if trial.get("peak_memory_gib") else "")
        + f"; scoring {_num(trial.get('eval_seconds'))} s.",
        f"- Projected full run: {_num(hours)} hours." if hours is not None else "- Projected full run: n/a.",
        "", "## Reproduce", "",
        "`config.yaml` beside this card is the trial's resolved config (the searched values in place, no search "
        "space). This trains the same settings with the same seed (the scores may differ a little: float "
        "arithmetic differs between machines, thread counts and a base kept loaded across trials):", "",
        "```bash",
        f"sweep start --config config.yaml --trials 1 --study {status['study']}-trial-{trial['number']}",
        "```", "",
    ]
    return "\n".join(lines)


def base_model_card(status: dict[str, Any], record: dict) -> str:
    """The README.md of an export of the untuned base (the pick when no trial beat it): no adapter."""
    baseline = status.get("baseline") or {}
    base = record["base_model"]
    front = {"base_model": base, "tags": ["sweep", "untuned-base"]}
    values = baseline.get("values") or {}
    best = status.get("best")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {status['study']}: the untuned base", "",
        f"**No adapter.** The submission of this study is the base model `{base}` itself, untuned: on the suite "
        f"that picks the submission ({status.get('pick_by') or status.get('optimize')}) no trial beat it.", "",
        "## Base", "",
        f"- Base: `{base}`" + (f" (revision `{record['revision']}`)" if record.get("revision") else "")
        + f", {_loaded_as(record.get('model') or {}, record.get('mode', 'qlora'))} when the study scored it "
        "(once, as the baseline, outside the sampler's trials).",
        "- Serve it with `sweep serve` on this directory: it loads the base as it was scored.", "",
        "## Scores", "",
        "| suite | untuned base |" + (f" best trial ({best['number']}) |" if best else ""),
        "|---|---|" + ("---|" if best else ""),
    ]
    best_values = next((t.get("values") or {} for t in status.get("trials", [])
                        if best and t["number"] == best["number"]), {})
    for suite, value in values.items():
        other = best_values.get(suite)
        lines.append(f"| {suite} | {value:.4f} |" + (f" {other:.4f} |" if best else ""))
    lines += ["", "| task | score |", "|---|---|"]
    for task, value in sorted((baseline.get("scores") or {}).items()):
        lines.append(f"| {task} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def reproduce_config(hyperparameters: dict) -> dict:
    """The trial's config to run again alone: searched values in place, no search space, its own seed."""
    config = {k: copy.deepcopy(v) for k, v in hyperparameters.items() if k != "trial"}
    trial = hyperparameters.get("trial") or {}
    config["search_space"] = {}
    study = dict(config.get("study") or {})
    study["n_trials"] = 1
    if "seed" in trial:
        study["trial_seed"] = trial["seed"]
    config["study"] = study
    return config


def _loaded_as(model: dict, mode: str) -> str:
    """How the trial held its base, in words (`trainer.mode` and `model.quant_type`)."""
    if mode == "lora":
        return "loaded in 16 bits (mode lora: bfloat16 on GPU, float32 on CPU)"
    quant = model.get("quant_type", "nf4")
    if quant == "int8":
        return "loaded in 8 bits (int8, LLM.int8())"
    return (f"loaded in 4 bits ({quant}" + (", double quantization" if model.get("double_quant", True) else "")
            + f", compute dtype {_compute_dtype(model.get('compute_dtype', 'auto'))})")


def _compute_dtype(name: str) -> str:
    return "auto: bfloat16 on a GPU, float32 on CPU" if name == "auto" else name


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
