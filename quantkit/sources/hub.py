"""Hugging Face Hub repo ids as model sources: ``ORG/NAME`` or ``ORG/NAME@REVISION``.

``fetch`` asks ``huggingface_hub.snapshot_download`` for the files a checkpoint needs (config, safetensors
weights and their index, tokenizer files, generation config; no other weight formats, no docs or images)
and returns the snapshot directory in huggingface_hub's own cache, so its cache layout, ``HF_HOME`` /
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` all apply as they do for transformers. With ``HF_HUB_OFFLINE=1``
(or no network) a cached snapshot is used as is; an id that is neither cached nor reachable is one error
line, and so is a malformed id.

A local directory of the same name always wins: ``resolve`` only calls here when no such path exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from quantkit.errors import QuantkitError, UsageError

# What a checkpoint needs from a repo; ``*.safetensors`` covers both layouts (single and sharded).
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
]
# ORG/NAME[@REVISION]: the Hub's own name rules (letters, digits, '-', '_', '.'; no '--' or '..', no
# leading/trailing '-' or '.'), and a revision that is a branch, a tag or a commit hash.
_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[\w.\-/]+))?$")


def looks_like_hub_id(src: str) -> bool:
    """Whether ``src`` (that is not a local path) was meant as a Hub id rather than a path: one ``/``
    between two non-empty parts, or an ``@REVISION``; not absolute, not ``./``, ``../`` or ``~``."""
    if not src or src.startswith(("/", ".", "~")) or "\\" in src:
        return False
    base = src.split("@", 1)[0]
    return "@" in src or (base.count("/") == 1 and "" not in base.split("/"))


def parse_hub_id(src: str) -> tuple[str, str | None]:
    """``"ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")`` (revision None = the default branch); UsageError if malformed."""
    m = HUB_ID.match(src)
    if not m or "--" in m["repo"] or ".." in m["repo"] or (m["rev"] is not None and (".." in m["rev"] or m["rev"].endswith("/"))):
        raise UsageError(f"model {src!r}: no such directory, and not a valid Hub id (ORG/NAME or ORG/NAME@REVISION, "
                         "names of letters, digits, '-', '_', '.')")
    return m["repo"], m["rev"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def fetch(src: str) -> Path:
    """Download (or find in huggingface_hub's cache) the checkpoint files of Hub id ``src``; its snapshot directory."""
    repo, rev = parse_hub_id(src)
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UsageError(f"model {src!r}: Hub ids need the huggingface_hub package (pip install huggingface_hub)") from None
    where = f"Hub repo {repo}" + (f" at revision {rev}" if rev else "")
    try:
        path = Path(snapshot_download(repo, revision=rev, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:  # not cached, and offline or unreachable (or a partial snapshot)
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the Hub cannot be reached ({_first_line(e)[:160]})"
        raise QuantkitError(f"model {src!r}: no such directory, and {where} is not in the cache "
                            f"({constants.HF_HUB_CACHE}) and {how}") from None
    except HFValidationError as e:
        raise UsageError(f"model {src!r}: not a valid Hub id ({_first_line(e)})") from None
    except HfHubHTTPError as e:  # not found, gated, private, bad revision, Hub down
        raise QuantkitError(f"model {src!r}: {where}: {_first_line(e)}") from None
    except OSError as e:  # connection errors, a cache that cannot be written
        raise QuantkitError(f"model {src!r}: {where}: {type(e).__name__}: {_first_line(e)}") from None
    if not (path / "config.json").is_file():
        raise QuantkitError(f"model {src!r}: {where} (snapshot {path}) has no config.json")
    if not any(path.glob("*.safetensors")):
        raise QuantkitError(f"model {src!r}: {where} (snapshot {path}) has no .safetensors weights "
                            "(quantkit reads safetensors checkpoints only)")
    return path
