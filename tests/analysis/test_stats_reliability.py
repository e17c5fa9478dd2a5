"""Feature statistics that resume without mixing (issue 22, item 2), on a tiny random T5Gemma 2.

Covers: a run killed at any write of any save resumes to exactly the uninterrupted result (one
atomic commit holds tensors and counters together); a resume with another SAE of the same site
and width, an edited or shortened dataset file, or another model config is refused naming the
file and the field, while an edit past ``rows_done`` is accepted; hostile or inconsistent saved
state (``rows_done`` of -50, 1e300 or null, truncated files, counters that do not add up, a row
twice in one top list, the older two-file layout) is refused naming the file and the field, by
``resume`` and by ``FeatureStats.load``; saves follow ``save_every``; symlinks are refused and
fixed temp names are never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from safetensors import safe_open
from safetensors.torch import save_file

from sae_lens_t5gemma import outputs
from sae_lens_t5gemma.analysis import feature_stats as F
from sae_lens_t5gemma.analysis import stats_state as S
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic

TEXTS = synthetic.stand_in_texts()  # 25 rows
CFG = S.StatsConfig(top_k=4, n_samples=6, left=3, right=2, context_size=24, batch_size=4, chunk_rows=8)
ENC = "encoder_blocks.1.attn.hook_out"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

    hf = T5Gemma2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    return HookedT5Gemma2(hf, AutoTokenizer.from_pretrained(tiny_model_dir))


def make_sae(seed: int, d_sae: int = 24) -> StandardSAE:
    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=64, d_sae=d_sae, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = ENC
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.fill_(-0.05)
    return sae


def run(model, out, sae=None, **kw):
    kw.setdefault("texts", TEXTS)
    kw.setdefault("save_every", 0)
    return F.corpus_stats(model, {"enc": sae or make_sae(5)}, out=out, config=CFG, progress=False, **kw)


@pytest.fixture(scope="module")
def full(model, tmp_path_factory):
    return run(model, tmp_path_factory.mktemp("full") / "s")


@pytest.fixture
def partial(model, tmp_path) -> Path:
    """A run stopped after 16 of the 25 rows (two saves of 8 rows each)."""
    run(model, tmp_path / "s", max_rows=16)
    return tmp_path / "s"


def assert_same(a: F.FeatureStats, b: F.FeatureStats) -> None:
    assert a.meta["rows_done"] == b.meta["rows_done"]
    for name, value in b.tensors["enc"].items():
        torch.testing.assert_close(a.tensors["enc"][name], value, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------- one atomic commit


class Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", [2, 3, 4, 5])
def test_a_kill_at_any_write_resumes_to_the_uninterrupted_result(model, tmp_path, monkeypatch, full, kill_at):
    # Each save writes state.safetensors then its readable copy stats.json: kill_at 2 and 4 die
    # between the two (the old layout's double count: tensors of one save, counters of another),
    # 3 and 5 die before a state write.
    calls = []
    real = outputs.atomic_write

    def dying(path, data):
        calls.append(Path(path).name)
        if len(calls) == kill_at:
            raise Killed
        return real(path, data)

    monkeypatch.setattr(outputs, "atomic_write", dying)
    with pytest.raises(Killed):
        run(model, tmp_path / "s")
    monkeypatch.setattr(outputs, "atomic_write", real)
    assert F.FeatureStats.load(tmp_path / "s").meta["rows_done"] == 8 * (kill_at // 2)  # whole saves only
    resumed = run(model, tmp_path / "s", resume=True)
    assert resumed.n_tokens("enc") == full.n_tokens("enc") > 0
    assert_same(resumed, full)
    assert_same(F.FeatureStats.load(tmp_path / "s"), full)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["state.safetensors", "stats.json"]


def test_saves_follow_save_every(model, tmp_path, monkeypatch):
    calls = []
    real = outputs.atomic_write
    monkeypatch.setattr(outputs, "atomic_write", lambda p, d: calls.append(Path(p).name) or real(p, d))
    run(model, tmp_path / "a", save_every=0)  # 25 rows, chunks of 8: 3 saves after chunks, 1 at the end
    assert calls == ["state.safetensors", "stats.json"] * 4
    calls.clear()
    run(model, tmp_path / "b", save_every=3600)  # the end only
    assert calls == ["state.safetensors", "stats.json"]
    with pytest.raises(ValueError, match=r"save_every must be a finite number of seconds >= 0, got nan"):
        run(model, tmp_path / "c", save_every=float("nan"))


# ----------------------------------------------------------------------------- fingerprints


def test_resume_with_another_sae_of_the_same_site_and_width_is_refused(model, partial):
    other = make_sae(6)  # same hook, same d_in and d_sae: only the weights differ
    with pytest.raises(ValueError) as e:
        run(model, partial, sae=other, resume=True)
    want = S.sae_weights_sha256(make_sae(5))
    assert str(e.value) == (
        f"Cannot resume {partial / 'state.safetensors'}: its saes[0].weights_sha256 (enc) is {want!r}, "
        f"this run's is {S.sae_weights_sha256(other)!r} (another SAE, or this one changed)"
    )


def _corpus(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(r + "\n" for r in rows))
    return path


def test_resume_with_an_edited_dataset_file_is_refused(model, tmp_path):
    data = _corpus(tmp_path, TEXTS)
    run(model, tmp_path / "s", texts=None, dataset=data, max_rows=16)
    edited = list(TEXTS)
    edited[3] = edited[3].replace("e", "a", 1)
    _corpus(tmp_path, edited)
    with pytest.raises(ValueError) as e:
        run(model, tmp_path / "s", texts=None, dataset=data, resume=True)

    def digest(rows):
        h = hashlib.sha256()
        for r in rows:
            S.hash_row(h, r)
        return h.hexdigest()[:16]

    assert str(e.value) == (
        f"Cannot resume {tmp_path / 's' / 'state.safetensors'}: its rows_sha256 (a hash of the first 16 rows) "
        f"is {digest(TEXTS[:16])}..., the first 16 rows of {str(data)!r} now give {digest(edited[:16])}...: "
        "the data changed since the saved run"
    )


def test_resume_with_a_shortened_dataset_file_is_refused(model, tmp_path):
    data = _corpus(tmp_path, TEXTS)
    run(model, tmp_path / "s", texts=None, dataset=data, max_rows=16)
    _corpus(tmp_path, TEXTS[:10])
    with pytest.raises(ValueError) as e:
        run(model, tmp_path / "s", texts=None, dataset=data, resume=True)
    assert str(e.value) == (
        f"Cannot resume {tmp_path / 's' / 'state.safetensors'}: its rows_done is 16, but {str(data)!r} now holds "
        "only 10 rows: the data changed since the saved run"
    )


def test_an_edit_past_rows_done_resumes_to_a_full_run_on_the_edited_file(model, tmp_path):
    data = _corpus(tmp_path, TEXTS)
    run(model, tmp_path / "s", texts=None, dataset=data, max_rows=16)
    edited = list(TEXTS)
    edited[20] = "A row nobody had read yet, changed before the resume."
    _corpus(tmp_path, edited)
    resumed = run(model, tmp_path / "s", texts=None, dataset=data, resume=True)
    assert_same(resumed, run(model, tmp_path / "fresh", texts=None, dataset=data))


def test_resume_under_another_model_config_is_refused(model, partial):
    before = S.model_config_sha256(model)
    model.hf_model.config.final_logit_softcapping = 12.5
    try:
        after = S.model_config_sha256(model)
        with pytest.raises(ValueError) as e:
            run(model, partial, resume=True)
    finally:
        del model.hf_model.config.final_logit_softcapping
    assert before != after and S.model_config_sha256(model) == before
    assert str(e.value) == (
        f"Cannot resume {partial / 'state.safetensors'}: its model_config_sha256 is {before!r}, this run's is {after!r}"
    )


# ----------------------------------------------------------------------------- hostile state


def _rewrite(folder: Path, stats=None, tensors=None, raw_stats: str | None = None) -> Path:
    """Rewrite state.safetensors with its record and tensors edited in place."""
    path = folder / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    meta = json.loads(header["stats"])
    if stats:
        stats(meta)
    if tensors:
        tensors(t)
    header["stats"] = raw_stats if raw_stats is not None else json.dumps(meta)
    save_file(t, str(path), metadata=header)
    return path


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _dup_top(t):
    t["enc/top_row"][0, 1], t["enc/top_pos"][0, 1] = t["enc/top_row"][0, 0], t["enc/top_pos"][0, 0]


def _overcount(t):
    t["enc/fire_count"][3] = int(t["enc/n_tokens"]) + 1


HOSTILE = {
    "rows_done -50": (dict(stats=_set("rows_done", -50)), "stats.rows_done is -50, expected an integer in 0..9007199254740992"),
    "rows_done 1e300": (dict(stats=_set("rows_done", 1e300)), "stats.rows_done is 1e+300, expected an integer in 0..9007199254740992"),
    "rows_done null": (dict(stats=_set("rows_done", None)), "stats.rows_done is None, expected an integer in 0..9007199254740992"),
    "rows_done true": (dict(stats=_set("rows_done", True)), "stats.rows_done is True, expected an integer in 0..9007199254740992"),
    "rows_done below its rows": (dict(stats=_set("rows_done", 8)), "tensor enc/top_row holds rows outside -1..rows_done-1 (7)"),
    "truncated record": (dict(raw_stats='{"format": "sae_lens_t5gemma.feature_stats/2", "rows_d'), "field 'stats' is not valid JSON (Unterminated string"),
    "NaN in record": (dict(raw_stats='{"rows_done": NaN}'), "field 'stats' is not valid JSON (NaN is not standard JSON)"),
    "n_tokens differs": (dict(stats=lambda m: m["saes"][0].__setitem__("n_tokens", 4089)), "tensor enc/n_tokens is "),
    "fire_count > n_tokens": (dict(tensors=_overcount), "tensor enc/fire_count has counts outside 0..n_tokens"),
    "a row twice in a top list": (dict(tensors=_dup_top), "tensor enc/top_row holds one (row, position) twice in a feature's top list"),
    "missing tensor": (dict(tensors=lambda t: t.pop("enc/hist")), "tensor enc/hist is missing"),
    "wrong dtype": (dict(tensors=lambda t: t.__setitem__("enc/act_sum", t["enc/act_sum"].float())), "tensor enc/act_sum is torch.float32 (24,), expected torch.float64 (24,)"),
    "bad config": (dict(stats=lambda m: m["config"].__setitem__("top_k", -1)), "stats.config is not a valid StatsConfig (StatsConfig.top_k must be a positive integer, got -1)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_state_is_refused_naming_the_file_and_field(model, partial, case):
    edit, message = HOSTILE[case]
    path = _rewrite(partial, **edit)
    with pytest.raises(S.StateError) as e:
        run(model, partial, resume=True)
    assert str(e.value).startswith(f"{path}: {message}")
    with pytest.raises(S.StateError) as e2:
        F.FeatureStats.load(partial)
    assert str(e2.value) == str(e.value)


def test_a_truncated_state_file_is_refused(model, partial):
    path = partial / "state.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(S.StateError) as e:
        run(model, partial, resume=True)
    assert str(e.value).startswith(f"{path}: not a readable safetensors file (")
    assert str(e.value).endswith("); rerun with --overwrite")


def test_a_truncated_readable_copy_changes_nothing(model, partial, full):
    # stats.json is a copy for people; resume and load read the state file only.
    (partial / "stats.json").write_text('{"rows_done": 1')
    assert_same(run(model, partial, resume=True), full)


def test_the_older_two_file_layout_is_refused(model, tmp_path):
    old = tmp_path / "s"
    old.mkdir()
    (old / "stats.json").write_text(
        json.dumps({"format": "sae_lens_t5gemma.feature_stats/1", "rows_done": 16})
    )
    (old / "enc.safetensors").write_bytes(b"")
    with pytest.raises(S.StateError) as e:
        run(model, old, resume=True)
    assert str(e.value) == (
        f"{old}: stats.json without state.safetensors: statistics written by an older version (before "
        "sae_lens_t5gemma.feature_stats/2) or a first save that never finished; rerun with --overwrite"
    )
    with pytest.raises(FileExistsError, match="pass resume=True"):
        run(model, old)


# ----------------------------------------------------------------------------- links and temp names


def test_a_symlink_at_the_state_file_is_refused(model, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "s"
    out.mkdir()
    (out / "state.safetensors").symlink_to(victim)
    with pytest.raises(outputs.OutputPathError) as e:
        run(model, out, overwrite=True)
    assert str(e.value).startswith(f"{out / 'state.safetensors'}: is a symlink (to {victim})")
    assert victim.read_text() == "precious"


def test_links_at_the_old_fixed_temp_names_are_never_followed(model, tmp_path, full):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "s"
    out.mkdir()
    for name in ("stats.json.tmp", "state.safetensors.tmp", "enc.safetensors.tmp"):
        (out / name).symlink_to(victim)
    assert_same(run(model, out), full)
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == ["state.safetensors", "stats.json"]
