"""Hub ids (ORG/NAME[@REVISION]) as model sources, offline, from a cache laid out as huggingface_hub lays it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit
from hf_reference import make_hf_model
from hub_cache import add_snapshot
from quantkit.errors import QuantkitError, UsageError
from quantkit.sources import hub, resolve

MAIN, V1 = "1" * 40, "2" * 40  # commit hashes of two snapshots
REPO = "quantkit-test/ernie-tiny"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_dir):
    """HF_HUB_CACHE with REPO at main (random:ernie-tiny) and at tag v1 (a different model, transformers-saved)."""
    root = tmp_path_factory.mktemp("hf")
    cache = root / "hub"
    add_snapshot(cache, REPO, tiny_dir, MAIN)
    other = root / "other"
    make_hf_model(seed=3).save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_dir / f).exists():
            (other / f).write_bytes((tiny_dir / f).read_bytes())
    add_snapshot(cache, REPO, other, V1, refs=("v1",))
    add_snapshot(cache, "quantkit-test/no-weights", tiny_dir, MAIN, skip=("model.safetensors",))
    return cache, other


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_huggingface_hub_itself_finds_the_hand_made_cache(hub_cache):
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    cache = hub_cache[0]
    snap = Path(snapshot_download(REPO, cache_dir=cache, local_files_only=True))
    assert snap == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN
    assert Path(try_to_load_from_cache(REPO, "config.json", cache_dir=cache)) == snap / "config.json"
    assert Path(try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision="v1")).parent.name == V1
    info = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    assert {rev.commit_hash for rev in info[REPO].revisions} == {MAIN, V1}
    assert info[REPO].refs.keys() >= {"main", "v1"}


def test_load_by_hub_id_equals_load_of_the_directory(offline_cache, tiny_dir):
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(quantkit.load(REPO)(ids), quantkit.load(tiny_dir)(ids))
    assert quantkit.load_tokenizer(REPO).encode("hello") == quantkit.load_tokenizer(tiny_dir).encode("hello")


@pytest.mark.parametrize("rev", ["v1", V1])
def test_revision_picks_that_snapshot(offline_cache, rev):
    _, other = offline_cache
    path = resolve(f"{REPO}@{rev}")
    assert path.name == V1
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(quantkit.load(f"{REPO}@{rev}")(ids), quantkit.load(other)(ids))


def test_local_directory_of_that_name_wins(offline_cache, tmp_path, monkeypatch, tiny_dir):
    local = tmp_path / REPO
    local.parent.mkdir(parents=True)
    local.symlink_to(offline_cache[1], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert resolve(REPO) == Path(REPO)  # the relative local path, not the cached snapshot (which is ernie-tiny)
    assert quantkit.load(REPO).config.vocab_size == 96


def test_uncached_revision_and_snapshot_without_weights_are_clear_errors(offline_cache):
    with pytest.raises(QuantkitError, match="not in the cache .* HF_HUB_OFFLINE is set"):
        resolve(f"{REPO}@no-such-tag")
    with pytest.raises(QuantkitError, match="no .safetensors weights"):
        resolve("quantkit-test/no-weights")


@pytest.mark.parametrize("bad", ["org/na--me", "org/name@", "-org/name", "org/name@a..b", "org/na me"])
def test_malformed_ids_are_usage_errors(bad):
    with pytest.raises(UsageError, match="not a valid Hub id"):
        hub.parse_hub_id(bad)


def test_paths_are_not_taken_for_hub_ids():
    for s in ("./org/name", "/abs/org", "~/org/name", "a/b/c", "name", "org/"):
        assert not hub.looks_like_hub_id(s), s
    for s in ("org/name", "org/name@main", "baidu/ERNIE-4.5-21B-A3B-PT"):
        assert hub.looks_like_hub_id(s), s


def _cli(args, cache, cwd, via_hf_home=False):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    env.update({"HF_HOME": str(cache.parent)} if via_hf_home else {"HF_HUB_CACHE": str(cache)})  # the cache is HF_HOME/hub
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_quantize_and_inspect_a_hub_id(hub_cache, tmp_path):
    cache, _ = hub_cache
    r = _cli(["quantize", REPO, "-o", "out", "--recipe", "w4g128"], cache, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    r = _cli(["generate", REPO, "--prompt", "hi", "--max-new-tokens", "3"], cache, tmp_path, via_hf_home=True)
    assert r.returncode == 0, r.stderr
    r = _cli(["inspect", f"{REPO}@v1"], cache, tmp_path, via_hf_home=True)
    assert r.returncode == 0 and V1 in r.stdout, r.stdout + r.stderr  # the v1 snapshot, found through HF_HOME


@pytest.mark.parametrize("src,code,text", [("nobody/not-cached", 1, "is not in the cache"),
                                           ("org/name@", 2, "not a valid Hub id")])
def test_cli_bad_hub_ids_are_one_error_line(hub_cache, tmp_path, src, code, text):
    r = _cli(["quantize", src, "-o", "out"], hub_cache[0], tmp_path)
    assert r.returncode == code
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_only_checkpoint_files_are_asked_for(monkeypatch, tiny_dir):
    """The patterns passed to snapshot_download keep config, weights, index and tokenizer files of a Hub-like listing."""
    from huggingface_hub import utils as hf_utils

    listing = [".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "original/consolidated.pth", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "images/logo.png", "onnx/model.onnx"]
    kept = set(hf_utils.filter_repo_objects(listing, allow_patterns=hub.ALLOW_PATTERNS))
    assert kept == {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
    seen = {}

    def fake_snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tiny_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve("org/name@abc") == tiny_dir
    assert seen == {"repo_id": "org/name", "revision": "abc", "allow_patterns": hub.ALLOW_PATTERNS}
