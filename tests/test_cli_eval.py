"""`quantkit eval perplexity` end to end, the protocol, and one-line errors with the right exit codes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import quantkit
from quantkit.evals.perplexity import perplexity, tokenize_for_windows

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def run_cli(*args, cwd=None):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_perplexity_cli_json_matches_manual_protocol(tmp_path, tiny_dir):
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    out = tmp_path / "r.json"
    r = run_cli("eval", "perplexity", str(tiny_dir), "--data", str(data), "--seq-len", "64", "--max-windows", "5", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"perplexity", "nll", "tokens", "seq_len", "windows", "model", "data"}
    assert res["windows"] == 5 and res["seq_len"] == 64 and res["tokens"] == 5 * 63

    # the same number by hand: tokenize once, 5 windows of 64, mean NLL of the 63 predicted tokens each
    model, tok = quantkit.load(tiny_dir), quantkit.load_tokenizer(tiny_dir)
    ids = torch.tensor(tok.encode(TEXT)[: 5 * 64]).view(5, 64)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    assert math.isclose(res["nll"], nll.item(), rel_tol=1e-5)
    assert math.isclose(res["perplexity"], math.exp(nll.item()), rel_tol=1e-5)


def test_prefix_tokenization_equals_full():
    tok = quantkit.load_tokenizer("random:ernie-tiny")
    text = TEXT * 20
    assert tokenize_for_windows(tok, text, 16, 3) == tok.encode(text)[:48]


def test_perplexity_of_a_perfect_model_is_one():
    class Oracle(torch.nn.Module):
        def forward(self, ids):  # puts all mass on the next token of a known cyclic sequence
            return torch.nn.functional.one_hot((ids + 1) % 7, 7).float() * 100

    r = perplexity(Oracle(), [i % 7 for i in range(100)], seq_len=10, progress=False)
    assert r.windows == 10 and r.tokens == 90 and abs(r.perplexity - 1.0) < 1e-6


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["eval", "perplexity", "/no/such/dir", "--data", "sotu"], 2, "no such directory"),
        (["eval", "perplexity", "random:ernie-tiny", "--data", "no-such-corpus"], 2, "neither an existing file"),
        (["eval", "perplexity", "random:ernie-tiny", "--data", "hf:wikitext:wikitext-2-raw-v1:test"], 1, "could not load dataset"),
        (["eval", "perplexity", "random:ernie-tiny", "--data", "{short}", "--seq-len", "4096"], 2, "fewer than one window"),
        (["eval", "perplexity", "random:unknown", "--data", "sotu"], 2, "unknown random model"),
        (["eval", "perplexity", "{notdir}", "--data", "sotu"], 2, "no config.json"),
        (["eval", "perplexity", "random:ernie-tiny"], 2, "Missing option '--data'"),
    ],
)
def test_bad_input_is_one_line_no_traceback(tmp_path, tiny_dir, args, code, needle):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    (tmp_path / "notdir").mkdir()
    args = [a.replace("{short}", str(short)).replace("{notdir}", str(tmp_path / "notdir")) for a in args]
    r = run_cli(*args)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_generate_cli(tiny_dir):
    r = run_cli("generate", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello")
