"""Data-parallel runs under torchrun (moecompress.dist): the same outputs as one process, one clear line when a
rank dies, refusal when ranks get different commands, and two "nodes" on 127.0.0.1."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import calib_file, tiny_checkpoint
from safetensors.torch import load_file

from moecompress.calib.stats import SUM_FIELDS, Stats
from moecompress.dist import World, command_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore")

RECIPE = """model: {model}
calibration:
  source: {calib}
  samples: 32
  seqlen: 64
passes:
  - pass: prune_experts
    ratio: 0.25
    criterion: reap
  - pass: merge_experts
    keep: 4
    method: hc
  - pass: prune_atomic
    neuron_ratio: 0.25
    criterion: heapr
    layout: uniform
  - pass: quantize
    bits: 4
    group_size: 8
    method: gptq
"""
STEPS = ["01-prune_experts", "02-merge_experts", "03-prune_atomic", "04-quantize"]
# Statistics are per-batch float32 sums accumulated in float64; ranks add their shares in another order.
STAT_RTOL = 1e-9
# Weights: prune/merge/HEAPr copy or combine the same tensors from the same decisions (equal up to float
# rounding). GPTQ solves each expert from Hessians that ranks add in another fp32 order; its rounding is
# discontinuous (one flipped code moves the error it propagates to later columns), so codes may differ in a few
# places: at least CODE_AGREEMENT of the 4-bit codes are equal and each projection's mean output error (what
# GPTQ minimises) is within ERROR_RTOL of the single process's.
WEIGHT_ATOL = 1e-6
CODE_AGREEMENT = 0.98
ERROR_RTOL = 0.05

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd(), "MOECOMPRESS_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "MOECOMPRESS_DIST_TIMEOUT": "120"}


def _torchrun(n: int, args: list[str], cache: Path, *, extra: list[str] | None = None, script: Path | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
              str(_free_port()), *(extra or [])]
    target = [str(script)] if script is not None else ["-m", "moecompress"]
    return subprocess.run([*launch, *target, *map(str, args)], env=_env(cache), capture_output=True, text=True,
                          timeout=timeout)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in glob.glob(str(folder / "*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    x, y = _tensors(a), _tensors(b)
    assert set(x) == set(y)
    for k in x:
        assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype, k
        if x[k].is_floating_point():
            torch.testing.assert_close(y[k], x[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
        else:
            assert torch.equal(x[k], y[k]), k  # integer codes, indices


def _stats_of(cache: Path, model: str) -> Stats:
    """The cached statistics of `model` (the recipe caches one set per step input)."""
    found = [st for st in map(Stats.load, sorted((cache / "stats").glob("*"))) if st.meta["model"] == model]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    """One recipe (REAP prune → HC merge → HEAPr → GPTQ) run by one process and by two torchrun ranks."""
    root = tmp_path_factory.mktemp("dp")
    model = tiny_checkpoint(root / "m", "qwen3_moe", num_experts=8)
    calib = calib_file(root / "c.jsonl")
    recipe = root / "r.yaml"
    recipe.write_text(RECIPE.format(model=model, calib=calib))
    outs = {}
    for n in (1, 2):
        res = _torchrun(n, ["run", recipe, "--out", root / f"out{n}"], root / f"cache{n}")
        assert res.returncode == 0, res.stderr[-3000:]
        outs[n] = (root / f"out{n}", root / f"cache{n}", res)
    return outs


def test_two_ranks_give_the_single_process_statistics(dp_runs):
    model = str(dp_runs[1][0].parent / "m")
    one, two = _stats_of(dp_runs[1][1], model), _stats_of(dp_runs[2][1], model)
    assert one.layers.keys() == two.layers.keys()
    for i, a in one.layers.items():
        b = two.layers[i]
        assert a.n_tokens == b.n_tokens
        assert torch.equal(a.sums["freq"], b.sums["freq"])  # integer counts (stored as float64): exact
        for name in SUM_FIELDS:
            torch.testing.assert_close(b.sums[name], a.sums[name], rtol=STAT_RTOL, atol=1e-12, msg=name)
        assert a.sample is not None and torch.equal(a.sample, b.sample)  # the same tokens, sampled the same way


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """4-bit codes of a pack-quantized int32 tensor (eight per word)."""
    return (packed.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF


def test_two_ranks_give_the_single_process_checkpoints(dp_runs):
    for step in STEPS[:-1]:
        a, b = dp_runs[1][0] / step, dp_runs[2][0] / step
        _assert_same_checkpoint(a, b)
        ra, rb = (json.loads((d / "report.json").read_text())["details"] for d in (a, b))
        for key in ("kept", "groups"):
            if key in ra:
                assert ra[key] == rb[key], (step, key)
    a, b = dp_runs[1][0] / STEPS[-1], dp_runs[2][0] / STEPS[-1]
    x, y = _tensors(a), _tensors(b)
    assert set(x) == set(y)
    equal = total = 0
    for k in x:
        if k.endswith("weight_packed"):
            equal += int((_codes(x[k]) == _codes(y[k])).sum())
            total += _codes(x[k]).numel()
        elif not k.endswith(("weight_scale", "weight_shape")):  # not quantized: the same tensors as one process
            torch.testing.assert_close(y[k], x[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
    assert total and equal / total >= CODE_AGREEMENT, equal / total
    qa, qb = (json.loads((d / "report.json").read_text())["details"] for d in (a, b))
    assert qa["expert_tokens"] == qb["expert_tokens"]  # routed-token counts: integers, exact
    for kind, err in qa["mean_output_error"].items():
        assert qb["mean_output_error"][kind] == pytest.approx(err, rel=ERROR_RTOL), kind


def test_world_size_and_tokens_by_rank_are_recorded(dp_runs):
    out2 = dp_runs[2][0] / STEPS[-1]
    dist = json.loads((out2 / "report.json").read_text())["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    tokens = dist["calibration_tokens_by_rank"]["quantize"]
    assert len(tokens) == 2 and all(t > 0 for t in tokens)
    assert len(dist["solve_seconds_by_rank"]) == 2 and len(dist["peak_rss_mb_by_rank"]) == 2
    prov = json.loads((out2 / "moecompress.json").read_text())
    assert prov["passes"][-1]["distributed"]["world_size"] == 2
    one = json.loads((dp_runs[1][0] / STEPS[-1] / "report.json").read_text())["distributed"]
    assert one == {"world_size": 1}


def test_only_rank_zero_prints(dp_runs):
    out = dp_runs[2][2].stdout
    assert out.count("run summary:") == 1
    assert "rank 1" not in out


def test_ranks_given_different_models_or_recipes_refuse_to_start(tmp_path):
    model = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    other = tiny_checkpoint(tmp_path / "m2", "qwen3_moe", seed=1)
    calib = calib_file(tmp_path / "c.jsonl")
    script = tmp_path / "launch.py"
    script.write_text(f"""
import os, sys
from moecompress.cli import main
model = {str(other)!r} if os.environ["RANK"] == "1" else {str(model)!r}
sys.argv = ["moecompress", "prune", model, "--out", {str(tmp_path / "out")!r}, "--ratio", "0.5",
            "--calib", {str(calib)!r}]
main()
""")
    res = _torchrun(2, [], tmp_path / "cache", script=script, timeout=120)
    assert res.returncode != 0
    assert "rank(s) 1 started with a different command line, model or recipe" in res.stderr
    assert "moecompress/cli.py" not in res.stderr  # one line per rank, no traceback of ours (torchrun prints its own)
    assert not (tmp_path / "out").exists()


def test_a_killed_rank_stops_the_others_with_one_line_and_a_rerun_completes(tmp_path):
    model = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    calib = calib_file(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    script = tmp_path / "launch.py"
    # rank 1 dies by SIGKILL when it reaches decoder layer 1 of the compress sweep
    script.write_text(f"""
import os, signal, sys
from moecompress.passes import base
real = base.observe_and_apply
def dying(lp, ctx, plan, index, layer, flow, **kw):
    if os.environ["RANK"] == "1" and index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(lp, ctx, plan, index, layer, flow, **kw)
base.observe_and_apply = dying
import moecompress.engine.run as er
er.observe_and_apply = dying
from moecompress.cli import main
sys.argv = ["moecompress", "quantize", {str(model)!r}, "--out", {str(out)!r}, "--bits", "4", "--group-size", "32",
            "--calib", {str(calib)!r}]
main()
""")
    t0 = time.time()
    res = _torchrun(2, [], tmp_path / "cache", script=script, timeout=180)
    assert res.returncode != 0 and time.time() - t0 < 120
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:") and "rank 0" in ln]
    assert len(lines) == 1, res.stderr[-2000:]
    assert not out.exists()
    rerun = _torchrun(2, ["quantize", model, "--out", out, "--bits", "4", "--group-size", "32", "--calib", calib],
                      tmp_path / "cache")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "report.json").is_file()
    # what the killed rank could not remove (its activation spill) the rerun removed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_two_nodes_on_localhost_match_one_process(tmp_path):
    """Two single-process "nodes" joined by the c10d rendezvous give the checkpoint one process gives."""
    model = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    calib = calib_file(tmp_path / "c.jsonl")
    args = ["prune", model, "--ratio", "0.5", "--criterion", "reap", "--calib", calib]
    single = _torchrun(1, [*args, "--out", tmp_path / "one"], tmp_path / "c1")
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "moecompress-test", "-m", "moecompress", *map(str, args), "--out", str(tmp_path / "two")]
        procs.append(subprocess.Popen(cmd, env=_env(tmp_path / "c2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "report.json").read_text())["distributed"]["world_size"] == 2


# ---- the pieces, in one process --------------------------------------------------------------------------
def test_blocks_partition_every_item_once():
    for n in range(0, 11):
        for size in (1, 2, 3, 4):
            blocks = [World(rank=r, size=size).block(n) for r in range(size)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_shard_batches_counts_real_tokens_before_each_share():
    masks = [torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]),
             torch.ones(1, 5, dtype=torch.long)]
    batches = [(torch.zeros_like(m), m) for m in masks]
    w0, w1 = World(rank=0, size=2), World(rank=1, size=2)
    own0, first0 = w0.shard_batches(batches, "x")
    own1, first1 = w1.shard_batches(batches, "x")
    assert len(own0) + len(own1) == 3 and first0 == 0
    assert first1 == sum(int(m.sum()) for _, m in own0)
    assert w0.calibrated["x"] == w1.calibrated["x"] == [first1, sum(int(m.sum()) for _, m in own1)]


def test_single_process_world_is_the_identity():
    w = World()
    t = torch.arange(4.0)
    w.all_reduce_([t])
    assert torch.equal(t, torch.arange(4.0))
    assert w.gather("x") == ["x"] and w.all_true(True) and not w.all_true(False)
    assert w.spread(3, lambda blk: [i * 10 for i in blk]) == [0, 10, 20]
    assert w.summary() == {"world_size": 1}


def test_command_fingerprint_reads_files_by_content(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("a: 1\n")
    before = command_fingerprint(["run", str(recipe)])
    recipe.write_text("a: 2\n")
    assert command_fingerprint(["run", str(recipe)]) != before
    assert command_fingerprint(["run", "x"]) == command_fingerprint(["run", "x"])


def test_commands_that_do_not_run_data_parallel_refuse(tmp_path, monkeypatch, capsys):
    from helpers import run_cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(["eval", str(tmp_path)], capsys)
    assert code == 2 and "does not run data-parallel" in err

