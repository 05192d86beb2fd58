"""The deterministic demo base model: a tiny Llama and a byte-level BPE tokenizer.

Offline demos and tests need a base model without a hub download. This module
builds one from fixed seeds and fixed text, identically on every machine: the
weights are drawn with NumPy's PCG64 generator (stable across platforms and
versions) and the BPE merges are learned by a small pure-Python learner with a
deterministic tie-break, rather than by the `tokenizers` trainer, whose
parallel counting gives no such promise.

The model is referred to by `DEMO_MODEL_ID`; `resolve_model_path` turns that id
into the path of the cached build, building it on first use. Adapters trained
on it record the id as `base_model_name_or_path`, so they resolve on any
machine that has this package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

DEMO_MODEL_ID = "sweep-demo/tiny-llama"
_BUILD_VERSION = 2
_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
_VOCAB_SIZE = 1024
"""At most: merges stop once every word of `_TOKENIZER_TEXT` is one token (about 900 tokens in all)."""

# Shapes of the demo model. Dimensions are multiples of 64, the NF4 block size.
DEMO_MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

# Text the tokenizer learns its merges from: the prompt templates and the words
# and digits of the demo's tasks (the digit task and evaluator.micro's shapes),
# plus common English so other text stays short.
_TOKENIZER_TEXT = """
### Instruction:
### Input:
### Response:
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Is 0 1 2 3 4 5 6 7 8 9 even or odd? even odd
Which is larger, 3 or 7? Which is smaller, 8 or 2? larger smaller
What is the last digit of 4 7 1? What is the first digit of 9 0 2? last first digit
Answer with one word. Answer with a number. yes no true false A B C D
Question: What colour is the sky, Ada? A. green B. blue C. red D. black white pink Answer: B
What colour is grass? How many legs has a cat? two six four eight Which animal barks? cat cow fish dog
Which animal swims? What do bees make? silk honey bread wool Which season is coldest? spring summer winter autumn
What is frozen water? steam mud oil ice How many days has a week? seven five ten six Which is a fruit?
chair apple stone shoe Which shape has three sides? circle square triangle line What does a key open? tree cloud
song door Which animal gives milk? bee What colour is snow? Which is hot? fire rain What do we read? cup book
Which animal flies? bird How many wheels has a bike? What do we drink? water sand Which season is hottest?
What shines at night? moon sun Which is a colour? What do cows eat? meat Which month comes first?
May June March January
Question: Ada has 3 apples and finds 4 more. How many apples does Ada have now? Answer: Ada has 3 + 4 = 7 apples.
#### 7 #### 10 #### 11 #### 12 #### 13 #### 14 #### 15 #### 16 #### 17 #### 18 = 5 + 6 =
Ada Ben Cleo Dev Eli Fay Gus Hana apples books coins shells stamps pens
Article: On Monday, a storm flooded the harbour. Ben saw it and said that the harbour had never been so busy.
Summary: A storm flooded the harbour on Monday. A fire closed the market on Tuesday. A parade filled the old mill
on Friday. A festival opened at the school on Sunday. Workers repaired the station. the bridge the park the library
Scenario: Cleo returned a lost wallet to its owner. Question: Is what Cleo did acceptable? Answer: yes no
helped a neighbour carry groceries, kept a promise to a friend, shared lunch with a new classmate,
took a bike without asking, lied to get a day off, read a friend's diary in secret, broke a window and blamed a child.
Question: Dev gets 5 coins, then 3 more. What number of coins does Dev hold?
Answer: Dev holds 5 + 3 = 8 coins. The answer is 8.
Scenario: Fay counts 4 7 1 pens. Question: Is Fay's count 4 7 1 even or odd? Answer:odd
the a an of to and in is it that for on with as was be by this are or from at
question answer choice correct number word letter summary summarize text
"""


def cache_root() -> Path:
    """Directory where built demo assets are cached (`SWEEP_CACHE_DIR` or ~/.cache/sweep)."""
    root = os.environ.get("SWEEP_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sweep"
    )
    return Path(root)


def resolve_model_path(name_or_path: str) -> str:
    """Returns what `from_pretrained` should load for `name_or_path`.

    The demo id resolves to the local build (built on first use); hub ids and
    local paths are returned unchanged.
    """
    if name_or_path == DEMO_MODEL_ID:
        return str(ensure_demo_base())
    return name_or_path


def ensure_demo_base(root: Path | None = None) -> Path:
    """Builds the demo base under `root` (default: the cache) unless present; returns its dir.

    The build is also registered in the Hugging Face hub cache under
    `DEMO_MODEL_ID`, so plain `from_pretrained("sweep-demo/tiny-llama")` (and
    peft's auto classes reading an adapter's `base_model_name_or_path`) find
    it offline.
    """
    target = (root or cache_root() / "models") / f"tiny-llama-v{_BUILD_VERSION}"
    if not (target / "sweep_demo_base.json").exists():
        _build_atomically(target)
    if root is None:
        register_in_hub_cache(target)
    return target


def register_in_hub_cache(build_dir: Path) -> Path | None:
    """Copies the build into the hub cache layout (refs/main -> snapshots/<hash>/); idempotent.

    Returns the snapshot directory, or None when the hub cache is not writable.
    """
    from huggingface_hub import constants

    manifest = (build_dir / "sweep_demo_base.json").read_bytes()
    commit = hashlib.sha1(manifest).hexdigest()
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + DEMO_MODEL_ID.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    try:
        if not (snapshot / "sweep_demo_base.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".sweep-", dir=_mkdir(repo_dir)))
            for f in build_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
            _mkdir(snapshot.parent)
            try:
                os.rename(tmp, snapshot)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        ref = _mkdir(repo_dir / "refs") / "main"
        if not ref.exists() or ref.read_text() != commit:  # resolved on every model load: write once
            ref.write_text(commit)
    except OSError:
        return None
    return snapshot


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_atomically(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so concurrent workers never see
    # half-written files; the loser of a race discards its copy.
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_demo_base(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "sweep_demo_base.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_demo_base(out_dir: Path) -> dict:
    """Writes the demo model and tokenizer to `out_dir`; returns its manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    model = build_model(vocab_size=len(tokenizer))
    model.save_pretrained(out_dir)
    manifest = {
        "model_id": DEMO_MODEL_ID,
        "build_version": _BUILD_VERSION,
        "sha256": {
            name: _sha256(out_dir / name) for name in ("model.safetensors", "tokenizer.json")
        },
    }
    (out_dir / "sweep_demo_base.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_tokenizer():
    """A byte-level BPE tokenizer with merges learned from `_TOKENIZER_TEXT`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(w for w, _ in pre.pre_tokenize_str(_TOKENIZER_TEXT))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(words, _VOCAB_SIZE - len(_SPECIAL_TOKENS) - len(alphabet))
    vocab_list = list(_SPECIAL_TOKENS) + alphabet + ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # Like Llama's tokenizer, prepend <s> when special tokens are requested.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=DEMO_MODEL_SHAPE["max_position_embeddings"],
    )


def _learn_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    splits = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, syms in splits.items():
            for a, b in zip(syms, syms[1:], strict=False):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in splits.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = out
    return merges


def build_model(vocab_size: int, seed: int = 0):
    """A Llama with weights drawn from per-tensor PCG64 streams.

    The output layer gets a larger scale than a fresh init (0.2 instead of
    0.02): it stays frozen under LoRA, and with small weights the logits it can
    produce are too flat for any adapter to make a confident prediction.
    """
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        **DEMO_MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            stream = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
            if name.endswith("norm.weight"):
                values = np.ones(param.shape, dtype=np.float32)
            else:
                std = 0.2 if name.startswith("lm_head") else config.initializer_range
                values = stream.normal(0.0, std, size=param.shape).astype(np.float32)
            param.copy_(torch.from_numpy(values))
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


if __name__ == "__main__":
    # `python -m trainer.demo_base` prints the demo base's local path, building it if needed.
    print(ensure_demo_base())
