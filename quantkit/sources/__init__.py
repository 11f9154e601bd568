"""Model sources: an HF-style directory, or a built-in name materialised as one (and cached).

Anything else is a local directory or, when no such path exists, a Hugging Face Hub id ``ORG/NAME[@REVISION]``
fetched through huggingface_hub (``sources/hub.py``).

Built-in names:
  ``random:ernie-tiny``                 tiny random ERNIE-4.5-MoE (tests)
  ``random:ernie-21b-a3b?layers=N``     21B-A3B dimensions, random weights, N layers (default 2), sharded
  ``random:<family>-tiny``              tiny random model of another family, in its Hub layout: qwen3-moe-tiny,
                                        qwen2-moe-tiny, mixtral-tiny, olmoe-tiny, glm4-moe-tiny,
                                        deepseek-v3-tiny (tests)
  ``random:<model>?layers=N``           another family at a real model's dimensions, N layers (default 2), bf16,
                                        sharded (memory benchmark): qwen3-30b-a3b, qwen1.5-moe-a2.7b, mixtral-8x7b,
                                        olmoe-1b-7b, glm4.5-air, deepseek-v2-lite
  ``demo:smollm2-moe``                  real-weights ERNIE-4.5-MoE built from SmolLM2-135M
  ``demo:smollm2-moe?FIELD=VALUE&...``  a variant of it: recipe fields changed (``sources/moe_split.py``'s
                                        Recipe), e.g. ``?top_k=6&calib_data=sotu:train``
  ``demo:smollm2-dense``                the same SmolLM2 as a dense ERNIE (the demo's reference)

Built models live under ``$QUANTKIT_CACHE`` (default ``~/.cache/quantkit``), in a directory whose name
carries the recipe version, so a new recipe is rebuilt. A build goes to a temporary directory that is
renamed at the end: an interrupted build never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qs

from quantkit.errors import UsageError


def cache_root() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit")


def _log(msg: str) -> None:
    print(f"[quantkit] {msg}", file=sys.stderr, flush=True)


def _build_cached(name: str, build) -> Path:
    """Return cache_root()/name, calling ``build(tmp_dir)`` first if it does not exist yet."""
    final = cache_root() / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name.replace('/', '_')}-", dir=final.parent))
    try:
        _log(f"building {name} (once; cached in {final.parent})")
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # built concurrently by another process: keep theirs
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _random(spec: str) -> Path:
    from quantkit.sources.random_models import ERNIE_21B_A3B, ERNIE_TINY, RANDOM_VERSION, write_random_checkpoint

    name, _, query = spec.partition("?")
    opts = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if name == "ernie-tiny":
        if opts:
            raise UsageError(f"random:ernie-tiny takes no options, got {query!r}")
        return _build_cached(
            f"random/ernie-tiny-v{RANDOM_VERSION}",
            lambda out: write_random_checkpoint(out, ERNIE_TINY, seed=0, dtype="float32", max_shard_bytes=1 << 30),
        )
    if name == "ernie-21b-a3b":
        layers = _layers_option(name, opts, 28)
        dims = dict(ERNIE_21B_A3B, num_hidden_layers=layers)
        return _build_cached(
            f"random/ernie-21b-a3b-L{layers}-v{RANDOM_VERSION}",
            lambda out: write_random_checkpoint(out, dims, seed=0, dtype="bfloat16", max_shard_bytes=1 << 30,
                                                progress=_progress),
        )
    from quantkit.sources.random_families import REAL, RANDOM_FAMILIES_VERSION, TINY, write_family_checkpoint

    if name in REAL:
        layers = _layers_option(name, opts, 64)
        return _build_cached(
            f"random/{name}-L{layers}-v{RANDOM_FAMILIES_VERSION}",
            lambda out: write_family_checkpoint(out, name, seed=0, dtype="bfloat16", max_shard_bytes=1 << 30,
                                                layers=layers),
        )
    if name in TINY:
        if opts:
            raise UsageError(f"random:{name} takes no options, got {query!r}")
        return _build_cached(
            f"random/{name}-v{RANDOM_FAMILIES_VERSION}",
            lambda out: write_family_checkpoint(out, name, seed=0, dtype="float32", max_shard_bytes=1 << 30),
        )
    raise UsageError(f"unknown random model {spec!r}: use ernie-tiny, ernie-21b-a3b?layers=N, one of {', '.join(TINY)} "
                     f"or one of {', '.join(REAL)} with ?layers=N")


def _layers_option(name: str, opts: dict, most: int) -> int:
    """The ``?layers=N`` option of a real-dimension random source (default 2), checked."""
    unknown = set(opts) - {"layers"}
    if unknown:
        raise UsageError(f"random:{name}: unknown option(s) {', '.join(sorted(unknown))} (known: layers)")
    try:
        layers = int(opts.get("layers", 2))
    except ValueError:
        raise UsageError(f"random:{name}: layers must be an integer, got {opts['layers']!r}") from None
    if not 1 <= layers <= most:
        raise UsageError(f"random:{name}: layers must be in 1..{most}, got {layers}")
    return layers


def _progress(i: int, n: int) -> None:
    _log(f"  wrote layer {i}/{n}")


def _demo(spec: str) -> Path:
    from quantkit.sources import smollm2_moe

    name, _, query = spec.partition("?")
    builders = {"smollm2-moe": smollm2_moe.build_smollm2_moe, "smollm2-dense": smollm2_moe.build_smollm2_dense}
    if name not in builders:
        raise UsageError(f"unknown demo model {name!r}: use one of {', '.join(builders)}")
    if not query:
        return _build_cached(f"demo/{name}-v{smollm2_moe.RECIPE_VERSION}", builders[name])
    if name != "smollm2-moe":
        raise UsageError(f"demo:{name} takes no options, got {query!r}")
    recipe, tag = _demo_recipe(query)
    return _build_cached(f"demo/{name}-v{smollm2_moe.RECIPE_VERSION}-{tag}",
                         lambda out: smollm2_moe.build_smollm2_moe(out, recipe))


def _demo_recipe(query: str):
    """``demo:smollm2-moe?FIELD=VALUE&...``: the demo's recipe with some fields changed (a variant, cached
    under a name made from the changes), e.g. ``?top_k=6`` or ``?calib_data=sotu:train``."""
    import dataclasses
    import hashlib

    from quantkit.sources.moe_split import Recipe

    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    base, changes = Recipe(), {}
    for item in filter(None, query.split("&")):  # not parse_qs: "+" joins corpora here, it is no space
        key, eq, raw = item.partition("=")
        if key not in fields or not eq:
            raise UsageError(f"demo:smollm2-moe: {item!r} is not FIELD=VALUE with a recipe field "
                             f"(known: {', '.join(fields)})")
        kind = type(getattr(base, key))
        try:
            changes[key] = tuple(float(v) for v in raw.split(",")) if kind is tuple else kind(raw)
        except ValueError:
            raise UsageError(f"demo:smollm2-moe: {key} must be of type {kind.__name__}, got {raw!r}") from None
    try:
        recipe = dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as e:
        raise UsageError(f"demo:smollm2-moe: {e}") from None
    canon = "&".join(f"{k}={changes[k]}" for k in sorted(changes))
    return recipe, hashlib.sha256(canon.encode()).hexdigest()[:10]


def resolve(src: str | os.PathLike) -> Path:
    """Turn a model source into an existing HF-layout directory (building a built-in one, or fetching a Hub
    repo, if needed); a local path of that name always wins over a Hub id."""
    s = str(src)
    if s.startswith("random:"):
        return _random(s[len("random:"):])
    if s.startswith("demo:"):
        return _demo(s[len("demo:"):])
    path = Path(s).expanduser()
    if not path.exists():
        from quantkit.sources import hub

        if hub.looks_like_hub_id(s):
            return hub.fetch(s)
        raise UsageError(f"model {s!r}: no such directory (or use a Hub id ORG/NAME[@REVISION] or a built-in name: "
                         "random:ernie-tiny, demo:smollm2-moe, ...)")
    if not path.is_dir():
        raise UsageError(f"model {s!r} is a file; give the checkpoint directory")
    return path
