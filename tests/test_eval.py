"""Evaluation: bundled offline lm-eval tasks on a tiny random model, retention math, the base-results cache."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import moecompress.eval as ev  # noqa: E402
from moecompress.errors import UserError  # noqa: E402
from moecompress.zoo.metrics import load_jsonl, text_logprobs  # noqa: E402
from moecompress.zoo.tokenizer import train_bpe_tokenizer  # noqa: E402

WORDS = "the cat sat on a mat while dogs ran over green hills and cold rivers in spring".split()
PPL_KEYS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def _write_data(data: Path) -> list[str]:
    rng = random.Random(0)
    data.mkdir(parents=True, exist_ok=True)
    val = [{"text": " ".join(rng.choice(WORDS) for _ in range(14)), "domain": ("story", "code")[i % 2]}
           for i in range(16)]
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    mc = []
    for r in val[:8]:
        words = r["text"].split()
        mc.append({"choices": [r["text"]] + [" ".join(rng.sample(words, len(words))) for _ in range(3)],
                   "label": 0, "domain": r["domain"]})
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    return [r["text"] for r in val]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    """A tiny random Qwen3-MoE saved like the reference model: weights, tokenizer and data/ side by side."""
    import transformers

    root = tmp_path_factory.mktemp("ref")
    texts = _write_data(root / "data")
    tok = train_bpe_tokenizer(texts * 4, vocab_size=512)
    cfg = transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root, model, tok


def test_bundled_tasks_match_direct_scoring(ref) -> None:
    root, model, tok = ref
    data = root / "data"
    res = ev.evaluate_model(model, tok, ev.EvalSpec(tasks="ref_ppl, ref_mc,ref_ppl:*", data_dir=data))
    assert set(res) == {"ref_ppl", "ref_mc", "ref_ppl:story", "ref_ppl:code"}
    for task in ("ref_ppl", "ref_ppl:story", "ref_ppl:code"):
        assert set(res[task]) == PPL_KEYS and all(math.isfinite(v) and v > 0 for v in res[task].values())
    assert set(res["ref_mc"]) == {"acc"} and 0 <= res["ref_mc"]["acc"] <= 1
    # The task dicts score exactly what the direct helpers score: same tokens, same prefix.
    texts = [r["text"] for r in load_jsonl(data / "val.jsonl")]
    scores = text_logprobs(model, tok, texts, seqlen=4096)
    bpb = -sum(s for s, _ in scores) / math.log(2) / sum(len(t.encode()) for t in texts)
    assert res["ref_ppl"]["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
    # lm-eval averages per-document 0/1 scores, mc_accuracy divides a count: same value, another order
    assert res["ref_mc"]["acc"] == pytest.approx(ev.mc_accuracy(model, tok, load_jsonl(data / "mc.jsonl")), abs=1e-12)
    assert math.isfinite(ev.token_perplexity(model, tok, texts, seqlen=16))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    limited = ev.evaluate_model(model, tok, ev.EvalSpec(tasks=["ref_mc:code"], data_dir=data, limit=2))
    assert set(limited) == {"ref_mc:code"}
    assert torch.equal(torch.rand(3), expected)  # lm-eval's global reseeding does not leak to the caller


def test_bundled_task_user_errors(ref, tmp_path: Path) -> None:
    root, model, tok = ref
    with pytest.raises(UserError, match="domains present: code, story"):
        ev.bundled_task_configs(["ref_ppl:math"], root / "data")
    with pytest.raises(UserError, match="--data-dir"):
        ev.bundled_task_configs(["ref_mc"], None)
    with pytest.raises(UserError, match="needs .*mc.jsonl"):
        ev.bundled_task_configs(["ref_mc"], tmp_path)


def test_unknown_task_names_bundled(ref, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, model, tok = ref

    class FakeIndex:  # lm-eval's real index takes ~15 s to build; its names are all this check needs
        all_tasks = ["arc_easy", "hellaswag"]

    monkeypatch.setattr(ev, "_default_task_manager", lambda: FakeIndex())
    with pytest.raises(UserError, match=r"unknown task 'arc_eazy'; did you mean arc_easy.*ref_ppl, ref_mc"):
        ev.evaluate_model(model, tok, ev.EvalSpec(tasks=["arc_eazy"], data_dir=root / "data"))

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the task names were checked")

    monkeypatch.setattr(ev, "load_for_eval", no_load)
    with pytest.raises(UserError, match="unknown task 'hellaswog'"):
        ev.cached_evaluate(root, ev.EvalSpec(tasks=["ref_mc", "hellaswog"]), tmp_path)


@pytest.mark.slow
def test_standard_task_offline_says_use_bundled(ref) -> None:
    root, model, tok = ref
    with pytest.raises(UserError, match="could not download .*arc_easy.*ref_ppl"):
        ev.evaluate_model(model, tok, ev.EvalSpec(tasks=["arc_easy"], limit=2))


def test_compare_retention_convention() -> None:
    base = {"ref_ppl": {"word_perplexity": 10.0, "bits_per_byte": 2.0}, "ref_mc": {"acc": 0.8}, "only": {"x": 1.0}}
    comp = {"ref_ppl": {"word_perplexity": 12.5, "bits_per_byte": 2.5}, "ref_mc": {"acc": 0.6, "acc_norm": 0.5}}
    cmp = ev.compare(base, comp)
    assert set(cmp) == {"ref_mc", "ref_ppl"} and set(cmp["ref_mc"]) == {"acc"}
    assert cmp["ref_ppl"]["word_perplexity"]["retention"] == pytest.approx(80.0)
    assert cmp["ref_ppl"]["bits_per_byte"]["retention"] == pytest.approx(80.0)
    assert cmp["ref_ppl"]["word_perplexity"]["higher_is_better"] is False
    assert cmp["ref_mc"]["acc"] == {"base": 0.8, "compressed": 0.6, "retention": pytest.approx(75.0),
                                    "higher_is_better": True}
    assert ev.compare({"t": {"acc": 0.0}}, {"t": {"acc": 0.5}})["t"]["acc"]["retention"] is None
    assert ev.lower_is_better("byte_perplexity") and not ev.lower_is_better("exact_match,strict-match")


def test_cached_evaluate_hits_second_time(ref, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _, _ = ref
    calls: list[int] = []
    real = ev.evaluate_model

    def counting(model, tok, spec, progress=None):
        calls.append(1)
        return real(model, tok, spec, progress)

    monkeypatch.setattr(ev, "evaluate_model", counting)
    spec = ev.EvalSpec(tasks=["ref_mc"], limit=4)  # data_dir defaults to MODEL/data
    first = ev.cached_evaluate(root, spec, tmp_path)
    second = ev.cached_evaluate(root, spec, tmp_path)
    assert first == second and len(calls) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    ev.cached_evaluate(root, spec.model_copy(update={"limit": 3}), tmp_path)
    assert len(calls) == 2


def test_eval_command(ref, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _, _ = ref
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    app = typer.Typer()
    app.command()(ev.eval_command)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, [str(root), "--tasks", "ref_mc", "--limit", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "ref_mc" in result.output and "acc" in result.output
    assert set(json.loads(out.read_text())["results"]["ref_mc"]) == {"acc"}
    missing = CliRunner().invoke(app, [str(tmp_path / "nope")])
    assert isinstance(missing.exception, UserError) and "does not exist" in str(missing.exception)


def test_spec_validation() -> None:
    assert ev.EvalSpec(tasks="a, b,,").tasks == ["a", "b"]
    with pytest.raises(ValidationError):
        ev.EvalSpec(tasks=[])
    with pytest.raises(ValidationError):
        ev.EvalSpec(tasks=["ref_ppl"], batchsize=4)  # type: ignore[call-arg]
