"""The WordNet example: the data-file parser, the stable tokenizer, the split, the staged
transformer, and the runtime serving it exactly as ``eenet evaluate`` simulates it.

No test needs the Debian package ``wordnet-base`` except those marked ``wordnet``
(skipped without it): the others write a tiny fake ``data.noun`` (and friends)
in ``tmp_path``. The runtime checks follow ``tests/test_runtime.py``: the bundled
checkpoint on random token sequences of different lengths (no dataset needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eenet._validation import EenetError
from eenet.cache import ExitCache, read_cache
from eenet.cli import main as cli_main
from eenet.examples import wordnet as wn
from eenet.examples.models import (PACKAGE_DIR, WORDNET_ARCH, WORDNET_CHECKPOINT,
                                   MultiExitTransformer, wordnet_transformer)
from eenet.ingest.costs import measure_costs
from eenet.ingest.model import cache_model
from eenet.runtime.model import EarlyExitModel
from test_runtime import SEEN, compare, fit_policy, serve

WORDNET_DIR = Path(os.environ.get(wn.ENV_VAR, wn.DEFAULT_DIR))
HAVE_WORDNET = all((WORDNET_DIR / name).is_file() for name in wn.FILES)

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
#: per file: (offset, lex_filenum, ss_type, words, gloss), in the wndb line format below
FAKE = {
    "data.noun": [(1740, 3, "n", ["entity"], "that which is perceived"),
                  (2137, 5, "n", ["dog", "domestic_dog", "Canis_familiaris"],
                   'a member of the genus Canis; "the dog barked all night"'),
                  (3000, 5, "n", [f"w{i}" for i in range(11)], "eleven words, w_cnt 0b"),
                  (4000, 13, "n", ["bread"], "food made from dough")],
    "data.verb": [(1740, 29, "v", ["breathe", "take_a_breath"], "draw air into the lungs"),
                  (2325, 38, "v", ["run"], "move fast by using one's feet")],
    "data.adj": [(1740, 0, "a", ["able"], "having the necessary means"),
                 (1950, 44, "s", ["broken(a)"], "physically separated into pieces")],
    "data.adv": [(1837, 2, "r", ["quickly", "rapidly"], "with rapid movements")],
}


def data_line(offset: int, lex: int, ss_type: str, words: list[str], gloss: str) -> str:
    """One line as ``man 5 wndb`` gives it (w_cnt two hex digits, one pointer, a frame)."""
    lemmas = " ".join(f"{w} {i % 16:x}" for i, w in enumerate(words))
    frames = " 01 + 02 00" if ss_type == "v" else ""
    return (f"{offset:08d} {lex:02d} {ss_type} {len(words):02x} {lemmas} 001 @ 00001740 "
            f"{ss_type if ss_type != 's' else 'a'} 0000{frames} | {gloss}  ")


def write_fake_wordnet(folder: Path, copies: int = 1) -> Path:
    """The four data files in ``folder``, each synset repeated ``copies`` times."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in FAKE.items():
        lines = [data_line(off + 10_000 * c, *rest) for c in range(copies)
                 for off, *rest in rows]
        (folder / name).write_text(HEADER + "\n".join(lines) + "\n")
    return folder


def small_transformer(seed: int = 0, n_layers: int = 4, d_embed: int | None = None
                      ) -> MultiExitTransformer:
    """An untrained transformer of the bundled factory's kind, small and quick."""
    torch.manual_seed(seed)
    return MultiExitTransformer(wn.N_CLASSES, n_buckets=512, max_len=wn.MAX_LEN,
                                n_layers=n_layers, d_model=32, n_heads=4, d_ff=64,
                                d_embed=d_embed).eval()


def random_tokens(n: int, seed: int, n_buckets: int = wn.N_BUCKETS,
                  lengths: tuple[int, int] = (1, wn.MAX_LEN - 1)) -> torch.Tensor:
    """[CLS] + a random number of random word ids, padded: int64 [n, MAX_LEN]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(wn.N_SPECIAL, n_buckets, (n, wn.MAX_LEN), generator=gen)
    n_words = torch.randint(lengths[0], lengths[1] + 1, (n, 1), generator=gen)
    ids[torch.arange(wn.MAX_LEN)[None, :] > n_words] = wn.PAD_ID
    ids[:, 0] = wn.CLS_ID
    return ids


# ---------------------------------------------------------------------------
# the data files
# ---------------------------------------------------------------------------
class TestParser:
    def test_reads_lex_file_words_and_gloss(self):
        s = wn.parse_line(data_line(2137, 5, "n", ["dog", "domestic_dog"], 'a canine; "a dog"'))
        assert (s.offset, s.lex_filenum, s.ss_type) == (2137, 5, "n")
        assert s.words == ("dog", "domestic dog")
        assert s.gloss == 'a canine; "a dog"'
        assert wn.LEXNAMES[s.lex_filenum] == "noun.animal"

    def test_word_count_is_hexadecimal(self):
        s = wn.parse_line(data_line(3000, 5, "n", [f"w{i}" for i in range(11)], "g"))
        assert len(s.words) == 11 and s.words[-1] == "w10"

    def test_adjective_marker_dropped(self):
        s = wn.parse_line(data_line(1950, 44, "s", ["broken(a)"], "in pieces"))
        assert s.words == ("broken",) and wn.LEXNAMES[s.lex_filenum] == "adj.ppl"

    def test_reads_the_four_files_in_order(self, tmp_path):
        synsets = wn.read_synsets(write_fake_wordnet(tmp_path))
        expected = [row for rows in FAKE.values() for row in rows]
        assert [(s.offset, s.lex_filenum) for s in synsets] == [(r[0], r[1]) for r in expected]
        assert synsets[5].text == "run : move fast by using one's feet"

    @pytest.mark.parametrize("line", ["garbage", "00001740 99 n 01 x 0 000 | bad lex file",
                                      "00001740 03 n 02 x 0 000 | too few words"])
    def test_damaged_line(self, line):
        with pytest.raises(EenetError, match="not a WordNet data line.*reinstall wordnet-base"):
            wn.parse_line(line)

    def test_missing_files_name_the_package_and_variable(self, tmp_path, monkeypatch):
        monkeypatch.delenv(wn.ENV_VAR, raising=False)
        with pytest.raises(EenetError, match=r"apt-get install wordnet-base.*EENET_WORDNET_DIR"):
            wn.load_wordnet("val", tmp_path / "absent")
        monkeypatch.setenv(wn.ENV_VAR, str(tmp_path / "absent"))
        with pytest.raises(EenetError, match="WordNet not found in .*absent"):
            wn.data_directory()

    def test_unreadable_file(self, tmp_path):
        write_fake_wordnet(tmp_path)
        (tmp_path / "data.verb").write_bytes(b"\xff\xfe not utf-8")
        with pytest.raises(EenetError, match="data.verb cannot be read.*wordnet-base"):
            wn.read_synsets(tmp_path)

    def test_cli_gives_one_line(self, tmp_path, monkeypatch):
        monkeypatch.setenv(wn.ENV_VAR, str(tmp_path / "absent"))
        result = CliRunner().invoke(cli_main, [
            "cache", "--model", "eenet.examples.models:wordnet_transformer",
            "--data", "wordnet:val", "--out", str(tmp_path / "c.h5")])
        assert result.exit_code == 1
        message = result.output.strip()
        assert len(message.splitlines()) == 1 and "apt-get install wordnet-base" in message
        assert not (tmp_path / "c.h5").exists()


class TestTokenizer:
    def test_crc32_buckets(self):
        bucket = wn.N_SPECIAL + zlib.crc32(b"dog") % (wn.N_BUCKETS - wn.N_SPECIAL)
        ids = wn.tokenize("The DOG, the dog's dog.")
        assert ids.dtype == np.int64 and ids.shape == (wn.MAX_LEN,)
        assert ids[0] == wn.CLS_ID and ids[2] == ids[5] == bucket
        assert ids[1] == ids[3] == wn.word_id("the") and ids[4] == wn.word_id("dog's")
        assert (ids[6:] == wn.PAD_ID).all()

    def test_cut_to_max_len(self):
        ids = wn.tokenize(" ".join(["w"] * 100), max_len=8)
        assert ids.shape == (8,) and (ids[1:] == wn.word_id("w")).all()

    def test_same_in_every_process(self):
        texts = ["a dog barks", "Canis familiaris; domestic dog", "x" * 40, "naïve café"]
        here = [wn.tokenize(t).tolist() for t in texts]
        code = ("import json, sys; from eenet.examples.wordnet import tokenize; "
                "print(json.dumps([tokenize(t).tolist() for t in json.loads(sys.argv[1])]))")
        for seed in ("0", "12345"):
            env = {**os.environ, "PYTHONHASHSEED": seed,
                   "PYTHONPATH": os.pathsep.join(sys.path)}
            out = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            assert json.loads(out) == here


class TestSplit:
    def test_disjoint_stratified_and_fixed(self):
        labels = np.repeat(np.arange(4), [100, 30, 7, 2])
        parts = {s: wn.split_indices(labels, s) for s in wn.SPLITS}
        joined = np.concatenate(list(parts.values()))
        assert np.array_equal(np.sort(joined), np.arange(len(labels)))
        assert [np.bincount(labels[parts["val"]], minlength=4).tolist(),
                np.bincount(labels[parts["test"]], minlength=4).tolist()] == [[10, 3, 1, 0]] * 2
        assert np.array_equal(parts["val"], wn.split_indices(labels, "val"))

    def test_dataset_from_files(self, tmp_path):
        folder = write_fake_wordnet(tmp_path, copies=10)
        sizes = {}
        for split in wn.SPLITS:
            ds = wn.load_wordnet(split, folder)
            x, y = ds.tensors
            assert x.dtype == torch.int64 and x.shape[1] == wn.MAX_LEN
            assert (x[:, 0] == wn.CLS_ID).all() and y.dtype == torch.int64
            sizes[split] = len(ds)
        assert sizes == {"train": 72, "val": 9, "test": 9}

    def test_unknown_split(self, tmp_path):
        with pytest.raises(EenetError, match="unknown WordNet split 'dev'"):
            wn.load_wordnet("dev", write_fake_wordnet(tmp_path))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# the staged transformer
# ---------------------------------------------------------------------------
class TestTransformer:
    @pytest.mark.parametrize("d_embed", [None, 8], ids=["full-width", "factorised"])
    def test_staged_forward_equals_plain(self, d_embed):
        model = small_transformer(d_embed=d_embed)
        x = random_tokens(9, seed=1, n_buckets=512)
        state, staged = x, []
        for stage, head in zip(model.stages, model.heads):
            state = stage(state)
            assert isinstance(state, tuple) and state[1].dtype == torch.bool
            staged.append(head(state))
        for a, b in zip(staged, model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    @pytest.mark.parametrize("d_embed", [None, 8], ids=["full-width", "factorised"])
    def test_padding_and_batch_do_not_change_a_sample(self, d_embed):
        """Exits of a sample alone, cut to its length, equal those in a padded mixed batch."""
        model = small_transformer(d_embed=d_embed)
        x = random_tokens(6, seed=2, n_buckets=512)
        with torch.inference_mode():
            batch = torch.stack(model(x), dim=1)  # [6, K, C]
            for i in range(len(x)):
                length = int((x[i] != wn.PAD_ID).sum())
                alone = torch.stack(model(x[i:i + 1, :length]), dim=1)
                torch.testing.assert_close(alone[0], batch[i], rtol=1e-4, atol=1e-5)

    def test_factorised_word_table(self):
        """A narrow word table is projected to the model width: fewer parameters per bucket."""
        wide, narrow = small_transformer(), small_transformer(d_embed=8)
        table = narrow.stages[0][0].words.weight
        assert tuple(table.shape) == (512, 8)
        assert tuple(narrow.stages[0][0].project.weight.shape) == (32, 8)
        assert isinstance(wide.stages[0][0].project, torch.nn.Identity)
        n_params = [sum(p.numel() for p in m.parameters()) for m in (wide, narrow)]
        assert n_params[0] - n_params[1] == 512 * (32 - 8) - 32 * 8

    def test_bad_input(self):
        with pytest.raises(EenetError, match="expected integer token ids"):
            small_transformer()(torch.zeros(2, wn.MAX_LEN))

    def test_exit_costs_grow(self):
        flops = measure_costs(small_transformer(), random_tokens(2, 0, n_buckets=512),
                              device="cpu", batch_size=2, timing=False).flops
        assert np.all(np.diff(flops) > 0)

    def test_checkpoint(self):
        path = PACKAGE_DIR / WORDNET_CHECKPOINT
        assert path.stat().st_size <= 4 * 2 ** 20
        model = wordnet_transformer()
        assert len(model.stages) == len(model.heads) == WORDNET_ARCH["n_layers"] >= 6
        assert not model.training
        with torch.inference_mode():
            outs = model(random_tokens(3, seed=0))
        assert [tuple(o.shape) for o in outs] == [(3, wn.N_CLASSES)] * len(outs)


# ---------------------------------------------------------------------------
# served = simulated (the pattern of tests/test_runtime.py)
# ---------------------------------------------------------------------------
COSTS = np.array([0.10, 0.18, 0.26, 0.34, 0.42, 0.50])  # ms, roughly equal layers
BUDGET = 0.26
METHODS = ["eenet", "maxprob", "patience"]


@pytest.fixture(scope="module")
def net():
    return wordnet_transformer()


@pytest.fixture(scope="module")
def token_data(net):
    """(fit cache, test tokens, test cache): random sequences of 1 to 39 words."""
    def cache_of(x: torch.Tensor, seed: int) -> ExitCache:
        with torch.inference_mode():
            logits = torch.stack(net(x), dim=1).numpy()  # K x [n, C] -> [n, K, C]
        rng = np.random.default_rng(seed)
        labels = np.where(rng.random(len(x)) < 0.8, logits[:, -1].argmax(axis=1),
                          rng.integers(0, wn.N_CLASSES, len(x)))
        return ExitCache(logits=logits, labels=labels, costs=COSTS)

    x_fit, x_test = random_tokens(768, seed=1), random_tokens(192, seed=2)
    return cache_of(x_fit, 1), x_test, cache_of(x_test, 2)


@pytest.mark.parametrize("method", METHODS)
def test_served_equals_simulated(net, token_data, method):
    fit, x, test = token_data
    policy = fit_policy(method, fit, BUDGET)
    exits = policy.exits(test)
    lengths = (x != wn.PAD_ID).sum(1).numpy()
    assert np.unique(exits).size >= 3, "the batch must mix exits"
    # samples of different lengths leave at different layers
    assert len({int(k) for k in exits[lengths < 10]} | {int(k) for k in exits[lengths > 30]}) > 1
    for batch_size in (1, 7, 64):
        n = 48 if batch_size == 1 else len(x)
        out = serve(EarlyExitModel(net, policy), x[:n], batch_size)
        SEEN["wordnet-transformer", method, batch_size] = compare(
            out, policy, test.subset(np.arange(n)))


def test_quickstart_on_fake_files(tmp_path):
    """``eenet quickstart --example wordnet``: both caches, the sweep, CSV, PNG and table."""
    folder = write_fake_wordnet(tmp_path / "wordnet", copies=40)
    result = CliRunner().invoke(cli_main, [
        "-q", "quickstart", "--example", "wordnet", "--data-dir", str(folder),
        "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results"),
        "--n-budgets", "2", "--methods", "maxprob,static", "--seeds", "1",
        "--overhead", "off"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "wordnet_val.h5").is_file()
    val, test = (read_cache(tmp_path / "cache" / f"wordnet_{s}.h5") for s in ("val", "test"))
    assert (val.n_samples, test.n_samples, val.n_classes) == (36, 36, wn.N_CLASSES)
    assert np.array_equal(val.costs, test.costs)
    for ext in ("csv", "png", "txt"):
        assert (tmp_path / "results" / f"quickstart_wordnet.{ext}").is_file()
    assert "maxprob" in result.output and "static" in result.output


# ---------------------------------------------------------------------------
# the real WordNet (wordnet-base)
# ---------------------------------------------------------------------------
@pytest.mark.wordnet
@pytest.mark.skipif(not HAVE_WORDNET, reason="needs wordnet-base (apt-get install wordnet-base)")
class TestRealWordNet:
    def test_counts(self):
        synsets = wn.read_synsets(WORDNET_DIR)
        labels = np.array([s.lex_filenum for s in synsets])
        counts = np.bincount(labels, minlength=wn.N_CLASSES)
        assert len(synsets) == 117_659 and (counts > 0).all() and counts.size == 45
        assert (counts.max(), counts.min()) == (14_435, 42)
        sizes = [len(wn.split_indices(labels, s)) for s in wn.SPLITS]
        assert sum(sizes) == len(synsets) and abs(sizes[1] / len(synsets) - 0.1) < 0.01

    def test_cache_serve_and_simulate(self, net, tmp_path):
        """A cache of real val samples (``eenet cache``'s path), a policy fitted on it, served
        on real test samples with padding masks of every length: exits as simulated."""
        val_h5, test_h5 = tmp_path / "val.h5", tmp_path / "test.h5"
        cache_model("eenet.examples.models:wordnet_transformer", "wordnet:val", val_h5,
                    limit=1000, costs="flops", verbose=False)
        cache_model("eenet.examples.models:wordnet_transformer", "wordnet:test", test_h5,
                    limit=200, costs_from=val_h5, verbose=False)
        val, test = read_cache(val_h5), read_cache(test_h5)
        assert val.n_classes == wn.N_CLASSES and val.n_exits == WORDNET_ARCH["n_layers"]
        assert np.array_equal(test.costs, val.costs)
        x = wn.load_wordnet("test").tensors[0][:200]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            policy = fit_policy("maxprob", val, float(val.costs[1] + val.costs[2]) / 2)
        for batch_size in (1, 64):
            n = 40 if batch_size == 1 else len(x)
            out = serve(EarlyExitModel(net, policy), x[:n], batch_size)
            compare(out, policy, test.subset(np.arange(n)))
        accs = (val.predictions() == val.labels[:, None]).mean(0)
        assert accs[-1] > 0.6 and accs[-1] > accs[0]
