"""The training loop: configs, smoke and overfit runs, exact resume, failures that lose nothing, DDP, sweeps, W&B."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file, save_file

import train
from data.stream import shift_and_pad, stack_rows
from data.tokenizer import load_tokenizer
from models import Transformer
from models.checkpoint import CheckpointError, load_model
from models.state import detach_state
from training import checkpointing, optim
from training.checkpointing import latest_checkpoint, list_checkpoints
from training.config import OptimConfig, TrainerConfig
from training.metrics import read_metrics
from training.optim import build_optimizer, lr_factor
from training.parallel import init_runtime, parallelize

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["model", "attention", "data", "optim", "trainer", "logger", "experiment", "debug", "sweep"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["name=test", *overrides])


def smoke(tmp_path: Path, *overrides: str):
    return compose_train("debug=smoke", f"trainer.run_dir={tmp_path}", *overrides)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


SHIPPED = [(group, option) for group in GROUPS for option in group_options(group)]


@pytest.mark.parametrize("group,option", SHIPPED, ids=[f"{g}={o}" for g, o in SHIPPED])
def test_every_shipped_config_composes_and_instantiates_on_meta(group, option):
    cfg = compose_train(f"{group}={option}", "trainer.run_dir=/unused")
    typed, _ = train.to_train_config(cfg)  # validates ModelConfig too
    with torch.device("meta"):
        model = Transformer(typed.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_paper_pg19_experiment_has_the_paper_shape():
    typed, _ = train.to_train_config(compose_train("experiment=pg19_paper", "trainer.run_dir=/unused"))
    m = typed.model
    assert (m.n_layers, m.n_heads, m.head_dim, m.ffn_dim, m.segment_len) == (12, 8, 128, 4096, 2048)
    assert typed.data.seq_len == 32768 and typed.optim.lr == 0.01 and typed.optim.warmup_steps == 1000
    assert typed.data.batch_size * typed.trainer.grad_accum * 8 == 64  # global batch 64 on one 8-GPU node
    assert typed.optim.name == "adafactor" and typed.trainer.activation_checkpointing


def test_wandb_sweep_files_are_valid_sweeps_of_real_keys():
    files = sorted((CONF / "sweep" / "wandb").glob("*.yaml"))
    assert files
    for path in files:
        spec = yaml.safe_load(path.read_text())
        assert spec["program"] == "train.py" and spec["method"] in ("grid", "random", "bayes")
        assert "${args_no_hyphens}" in spec["command"]
        overrides = [f"{key}={next(iter(values.get('values', [values.get('value')])))}"
                     for key, values in spec["parameters"].items()]
        train.to_train_config(compose_train(*overrides, "trainer.run_dir=/unused"))  # every key exists


def test_misspelt_or_mistyped_keys_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        compose_train("optim.lrr=0.1")
    with pytest.raises(ConfigCompositionException, match="model.dim=abc"):
        compose_train("model.dim=abc")
    with pytest.raises(ValueError, match="ModelConfig.n_heads=3 must divide ModelConfig.dim=32"):
        train.to_train_config(compose_train("debug=smoke", "model.n_heads=3", "trainer.run_dir=/unused"))


def test_smoke_run_writes_metrics_and_a_loadable_checkpoint(tmp_path):
    summary = train.train(smoke(tmp_path))
    assert summary["step"] == 3 and set(summary["losses"]) == {1, 2, 3}
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["train/loss"] for r in records] == [summary["losses"][s] for s in (1, 2, 3)]
    assert all(0 < r["gate/layer1/head0"] < 1 for r in records) and "memory/M_norm/layer0" in records[0]
    model, meta = load_model(latest_checkpoint(tmp_path))
    assert meta["train_config"]["model"]["dim"] == 32 and meta["step"] == 3
    assert model.config.n_kv_heads == 1


def test_periodic_evaluation_logs_validation_and_passkey(tmp_path):
    train.train(smoke(tmp_path, "trainer.eval_every=2", "trainer.max_steps=2",
                      "evaluation.periodic=[{task: passkey, lengths: [256], depths: [0.5], trials: 1}]"))
    (record,) = [r for r in read_metrics(tmp_path) if "val/loss" in r]
    assert record["step"] == 2 and record["val/perplexity"] == pytest.approx(math.exp(record["val/loss"]))
    classes = [record[f"val/passkey_exact/256/{c}"] for c in ("inside", "straddles", "opens")]
    assert all(v in (0.0, 1.0) for v in classes)  # one prompt per offset class (segment 64)
    assert record["val/passkey_exact"] == pytest.approx(sum(classes) / 3)
    assert record["val/passkey_exact/256"] == record["val/passkey_exact"]  # the only length is the mean


def test_probe_metrics_during_and_after_training_and_the_longest_training_length(tmp_path):
    """A periodic memory_probe task logs the needle share at each periodic evaluation (the values a direct probe of
    the same weights gives); a final one labelled probe writes the full probe to <run_dir>/probe; passkey tables count
    multiples of the longest training sequence, stages included."""
    from evaluation.memory_probe import needle_share_summary, probe_memory
    from training.stages import longest_training_length

    probe = "task: memory_probe, lengths: [256], depths: [0.0, 0.5, 1.0], seed: 1234"
    train.train(smoke(tmp_path, "trainer.eval_every=2", "trainer.max_steps=2",
                      f"evaluation.periodic=[{{{probe}, trials: 1, knockouts: false, segment_curve: false}}]",
                      f"evaluation.final=[{{{probe}, label: probe}}]"))
    (record,) = [r for r in read_metrics(tmp_path) if "val/loss" in r]
    model = load_model(latest_checkpoint(tmp_path))[0].eval()
    direct = needle_share_summary(probe_memory(model, load_tokenizer("byte"), [256], (0.0, 0.5, 1.0), 1, 1234,
                                               knockouts=False, segment_curve=False))
    assert direct["probe/needle_share/256/mean"] == pytest.approx(record["probe/needle_share/256/mean"], rel=1e-6)
    assert 0 < record["probe/needle_share/256/mean"] < 1
    assert (tmp_path / "probe" / "memory_probe.md").is_file() and (tmp_path / "probe" / "memory_probe.json").is_file()
    config = {"data": {"seq_len": 512, "seq_len_mix": [256, 384]},
              "trainer": {"stages": [{"data": {"seq_len_mix": [512, 1024]}}, {"data": {"seq_len": 768}}]}}
    assert longest_training_length(config) == 1024
    assert longest_training_length({"data": {"seq_len": 300}}) == 300


def test_overfitting_one_batch(tmp_path):
    summary = train.train(compose_train("debug=overfit", f"trainer.run_dir={tmp_path}", "trainer.ckpt_every=0"))
    losses = summary["losses"]
    assert losses[1] > 5.0  # ~ln(256) at initialisation
    assert losses[max(losses)] < 0.3


def losses_of(summary):
    return [summary["losses"][s] for s in sorted(summary["losses"])]


class SignalAt:
    """Wrap train.forward_backward to send `signum` to this process during optimizer step `step` (1-based)."""

    def __init__(self, step: int, grad_accum: int = 1, signum: int = signal.SIGUSR1):
        self.calls, self.at, self.signum = 0, step * grad_accum, signum
        self.inner = train.forward_backward

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_checkpoint_then_resume_equals_uninterrupted(tmp_path, monkeypatch, signum):
    extra = ["trainer.max_steps=6", "trainer.grad_accum=2"]
    full = train.train(smoke(tmp_path / "full", *extra))

    monkeypatch.setattr(train, "forward_backward", SignalAt(3, grad_accum=2, signum=signum))
    stopped = train.train(smoke(tmp_path / "run", *extra))
    assert stopped["stopped_by_signal"] and stopped["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert signal.getsignal(signum) is not stopped  # handlers restored (not left pointing at the run)
    monkeypatch.undo()

    resumed = train.train(smoke(tmp_path / "run", *extra))  # trainer.resume=auto picks up step 3
    assert resumed["resumed_from"].endswith("step_00000003")
    assert losses_of(stopped) + losses_of(resumed) == losses_of(full)  # exactly equal


def write_documents(path: Path, n: int = 12) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "train.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"Document {i}. " + "lorem ipsum dolor sit amet " * (20 + 13 * i)}) + "\n")
    return path


def test_resume_with_document_stream_and_carried_memory(tmp_path):
    docs = write_documents(tmp_path / "docs")
    extra = ["data=pg19", f"data.source={docs}", "data.val_split=null", "data.seq_len=128",
             "model.segment_len=32", "trainer.carry_state=true", "trainer.tbptt_segments=2",
             "trainer.max_steps=8"]
    full = train.train(smoke(tmp_path / "full", *extra))
    first = train.train(smoke(tmp_path / "run", *extra, "trainer.ckpt_every=4"))
    assert losses_of(first) == losses_of(full)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000008")
    resumed = train.train(smoke(tmp_path / "run", *extra))
    assert resumed["resumed_from"].endswith("step_00000004")
    assert losses_of(resumed) == losses_of(full)[4:]
    carry = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000004" / "carry.safetensors"))
    assert carry["rank0/layer0/matrix"].abs().sum() > 0


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    train.train(smoke(tmp_path, "trainer.ckpt_every=1", "trainer.max_steps=2"))
    before = list_checkpoints(tmp_path)
    assert [p.name for p in before] == ["step_00000001", "step_00000002"]
    weights_before = (before[-1] / "model.safetensors").read_bytes()

    real_save_file = checkpointing.save_file

    def crash_on_optimizer(tensors, path, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            Path(path).write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        train.train(smoke(tmp_path, "trainer.ckpt_every=1", "trainer.max_steps=4"))
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == before  # no half checkpoint under a step_* name
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert (before[-1] / "model.safetensors").read_bytes() == weights_before

    # a crash that killed the process leaves a temporary directory: it is ignored
    (tmp_path / "checkpoints" / ".tmp-step_00000003-dead").mkdir()
    resumed = train.train(smoke(tmp_path, "trainer.max_steps=3"))
    assert resumed["resumed_from"].endswith("step_00000002") and set(resumed["losses"]) == {3}


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    train.train(smoke(tmp_path, "trainer.max_steps=1"))
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        train.train(smoke(tmp_path, "trainer.max_steps=2"))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        train.train(smoke(tmp_path / "other", f"trainer.resume={tmp_path}/nope"))


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    train.train(smoke(tmp_path, "trainer.max_steps=1"))
    with pytest.raises(CheckpointError, match="wrong shape"):
        train.train(smoke(tmp_path, "trainer.max_steps=2", "model.dim=64"))


def test_missing_data_path_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train.train(smoke(tmp_path, "data=pg19", f"data.source={missing}"))
    with pytest.raises(ValueError, match="needs data.source"):
        train.train(smoke(tmp_path, "data=pg19", "data.source=null"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train.train(smoke(tmp_path, "trainer.max_steps=2", "trainer.ckpt_every=1"))
    good = latest_checkpoint(tmp_path)
    good_bytes = {p.name: p.read_bytes() for p in good.iterdir()}
    inner = train.forward_backward

    def poisoned(*args, **kwargs):
        loss, state = inner(*args, **kwargs)
        return float("nan"), state

    monkeypatch.setattr(train, "forward_backward", poisoned)
    with pytest.raises(train.NonFiniteLossError, match=r"step 2: loss=nan.*step_00000002 and was not touched"):
        train.train(smoke(tmp_path, "trainer.max_steps=5", "trainer.ckpt_every=1"))
    assert latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == good_bytes


def test_truncated_bptt_same_loss_different_gradients(tmp_path):
    cfg, _ = train.to_train_config(smoke(tmp_path))
    runtime = init_runtime(cfg.trainer)
    batch = fixed_batch(4, 256)
    grads, losses = {}, {}
    for k in (0, 1, 2, 4):
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        cfg.trainer.tbptt_segments = k
        losses[k], _ = train.forward_backward(model, batch, None, runtime, cfg.trainer, 64, 1.0, True)
        grads[k] = model.tok_embeddings.weight.grad.clone()
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) == pytest.approx(losses[4], rel=1e-6)
    torch.testing.assert_close(grads[4], grads[0], rtol=1e-5, atol=1e-7)  # 4 segments: nothing truncated
    assert (grads[1] - grads[0]).abs().max() > 1e-4 and (grads[2] - grads[1]).abs().max() > 1e-4


def test_sparse_loss_computes_logits_only_where_the_loss_is_and_matches_the_dense_step(tmp_path):
    """With a loss on a few tokens (passkey answers), forward_backward asks for logits at those positions only;
    loss and every gradient equal a dense computation over all logits, also chunked (truncated BPTT) and with
    per-token write scales."""
    cfg, _ = train.to_train_config(smoke(tmp_path))
    runtime = init_runtime(cfg.trainer)
    batch = fixed_batch(3, 256)
    mask = torch.zeros(3, 256)
    mask[0, 250:255], mask[1, 100:103], mask[2, 7] = 1.0, 2.0, 0.5  # sparse, weighted, in several chunks
    batch["loss_mask"] = mask
    batch["write_scale"] = torch.rand(3, 256, generator=torch.Generator().manual_seed(1)) * 4
    for k in (0, 2):
        cfg.trainer.tbptt_segments = k
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        seen = []
        model.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out.logits.shape))
        loss, _ = train.forward_backward(model, batch, None, runtime, cfg.trainer, 64, 0.25, True)
        assert seen[0] == ((9, 256) if k == 0 else (4, 256))  # k=2: the first 128 tokens hold 3 + 1 targets
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}

        torch.manual_seed(0)
        dense = Transformer(cfg.model)
        chunk = 64 * k if k else 256
        state, expected = None, 0.0
        for start in range(0, 256, chunk):
            span = slice(start, start + chunk)
            out = dense(batch["tokens"][:, span], state, batch["write_scale"][:, span])
            token_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1),
                                                           batch["targets"][:, span].flatten(), reduction="none")
            chunk_loss = (token_loss * mask[:, span].flatten()).sum()
            (chunk_loss * 0.25).backward()
            expected += chunk_loss.item()
            state = detach_state(out.state)
        assert loss == pytest.approx(expected, rel=1e-6)
        for name, p in dense.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"logits_at must be a bool tensor of the tokens' shape \(3, 256\)"):
        model(batch["tokens"], logits_at=mask)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    cfg, _ = train.to_train_config(smoke(tmp_path))
    runtime = init_runtime(cfg.trainer)
    batch = fixed_batch(2, 256)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        cfg.trainer.activation_checkpointing = checkpointed
        module = parallelize(model, cfg.trainer, runtime)
        train.forward_backward(module, batch, None, runtime, cfg.trainer, 64, 1.0, True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert [n for n, _ in model.named_parameters()] == list(grads[0])  # names unchanged
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8)


def test_parameter_groups_and_schedule():
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, gate_lr_multiplier=10.0, warmup_steps=10, min_lr_ratio=0.1)
    model = Transformer(train.to_train_config(smoke(Path("/unused")))[0].model)
    optimizer = build_optimizer(model, cfg)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    gates = {id(layer.attention.gate_logit) for layer in model.layers}
    assert {id(p) for p in by_name["gates"]["params"]} == gates
    assert by_name["gates"]["lr"] == pytest.approx(1e-2) and by_name["gates"]["weight_decay"] == 0.0
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norms <= {id(p) for p in by_name["no_decay"]["params"]} and by_name["no_decay"]["weight_decay"] == 0
    assert by_name["decay"]["weight_decay"] == 0.1
    counted = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(counted) == sorted(id(p) for p in model.parameters()) and len(set(counted)) == len(counted)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1) and lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55) and lr_factor(110, cfg, 110) == pytest.approx(0.1)


def test_fused_adamw_steps_like_the_per_tensor_loop(monkeypatch):
    """build_optimizer picks PyTorch's fused AdamW for plain CPU parameters; five steps of it give the parameters of
    the per-parameter loop (torch's reference implementation, CPU's default) to float32 rounding."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, gate_lr_multiplier=10.0)
    model = Transformer(train.to_train_config(smoke(Path("/unused")))[0].model)
    twin = Transformer(model.config)
    twin.load_state_dict(model.state_dict())
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    fused = build_optimizer(model, cfg)
    monkeypatch.setattr(optim, "_fusable", lambda groups: None)
    loop = build_optimizer(twin, cfg)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"] and not loop.defaults["foreach"]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert (p - initial[name]).abs().max() > 1e-3, name  # every parameter moved: the comparison means something


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_retain_heap_serves_activation_sized_blocks_from_the_heap_and_keeps_them():
    """training.parallel.retain_heap (train.py's default on CPU, trainer.retain_heap), read off glibc's own
    accounting (mallinfo2) in fresh processes (the setting is process-wide): under glibc's defaults a 16 MiB block is
    mapped on its own (fresh pages at every allocation) and nothing stays after free, as is a 256 MiB one (above
    the 32 MiB ceiling of glibc's dynamic threshold: a 32K-token activation) and a 3 GiB one (above any trim threshold
    mallopt could set: only "never trim" keeps it; virtual, its pages are never touched); after retain_heap() all
    three come from the heap and stay there, free, for the next allocation. The page faults this saves are measured by
    benchmarks/profile_step.py and benchmarks/train_throughput.py (README "Performance")."""
    script = (
        "import ctypes, sys\n"
        "from training.parallel import retain_heap\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',\n"
        "                                               'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.mallinfo2.restype = Info\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "if sys.argv[1] == 'retain':\n"
        "    assert retain_heap()\n"
        "for mib in (16, 256, 3072):\n"
        "    before = libc.mallinfo2().hblkhd\n"
        "    block = libc.malloc(mib * 2**20)\n"
        "    mapped = libc.mallinfo2().hblkhd - before\n"
        "    libc.free(block)\n"
        "    print(mib, mapped, libc.mallinfo2().keepcost)\n"
    )
    results = {}
    for mode in ("default", "retain"):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        if "mallinfo2" in done.stderr:
            pytest.skip("glibc without mallinfo2 (< 2.33)")
        assert done.returncode == 0, done.stderr[-2000:]
        results[mode] = {int(mib): (int(mapped), int(kept)) for mib, mapped, kept in
                         (line.split() for line in done.stdout.splitlines())}
    for mib in (16, 256, 3072):
        size = mib * 2**20
        assert results["default"][mib][0] >= size and results["default"][mib][1] < size  # mapped, then unmapped
        assert results["retain"][mib][0] == 0 and results["retain"][mib][1] >= size  # from the heap, kept after free


def test_wandb_offline_run_writes_into_the_run_directory(tmp_path):
    summary = train.train(smoke(tmp_path, "logger=wandb"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert runs[0].name.endswith(run_id) and summary["step"] == 3


def fixed_batch(batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(batch):
        sequence = torch.randint(0, 256, (seq_len + 1,), generator=g).tolist()
        rows.append(shift_and_pad(sequence, seq_len, 0, loss_from=1 + 37 * b))  # different target counts per row
    return stack_rows(rows, [True] * batch)


def _distributed_gradients(rank: int, world: int, parallel: str) -> dict[str, torch.Tensor]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke", "trainer.run_dir=/unused", "name=ddp"])
    typed, _ = train.to_train_config(cfg)
    typed.trainer.parallel = parallel
    runtime = init_runtime(typed.trainer)
    torch.manual_seed(0)
    model = Transformer(typed.model)
    module = parallelize(model, typed.trainer, runtime)
    batch = fixed_batch(4, 256)
    rows = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    n_targets = float(batch["loss_mask"].sum())
    train.forward_backward(module, rows, None, runtime, typed.trainer, 64, world / n_targets, True)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).contiguous()
    return grads


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, parallel: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        # the DDP module is released when this call returns, before the group is destroyed: a DDP reducer that
        # outlives destroy_process_group frees the gloo group itself, joining gloo's threads while holding the GIL
        # they wait for (a deadlock at exit, seen with torch 2.13)
        grads = _distributed_gradients(rank, world, parallel)
        if rank == 0:
            save_file(grads, os.path.join(out_dir, "grads.safetensors"))
        dist.barrier()  # no collective still in flight when the group goes
    finally:
        dist.destroy_process_group()
    # with torch 2.13 about one spawned rank in ten aborts in interpreter teardown after the group is destroyed
    # ("terminate called without an active exception"); the gradients are written by then, so leave without it
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gradients_equal_one_process(tmp_path, parallel):
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), parallel),
                                nprocs=2, join=True)
    distributed = load_file(str(tmp_path / "grads.safetensors"))
    cfg, _ = train.to_train_config(smoke(tmp_path))
    runtime = init_runtime(TrainerConfig(device="cpu", precision="fp32"))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    batch = fixed_batch(4, 256)
    train.forward_backward(model, batch, None, runtime, cfg.trainer, 64, 1 / float(batch["loss_mask"].sum()), True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(distributed[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def run_train_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "WANDB_MODE": "disabled"})


def test_multirun_with_the_local_submitit_launcher(tmp_path):
    result = run_train_cli("-m", "hydra/launcher=local", "debug=smoke", "attention=infini_linear,infini_delta",
                           f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        records = read_metrics(tmp_path / job)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert latest_checkpoint(tmp_path / job) is not None
    updates = {json.loads((latest_checkpoint(tmp_path / j) / "config.json").read_text())["model"]["memory_update"]
               for j in ("0", "1")}
    assert updates == {"linear", "delta"}


def test_cli_reports_an_unknown_key(tmp_path):
    result = run_train_cli("debug=smoke", "trainer.max_stepz=3", cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "max_stepz" in result.stderr


def test_init_from_a_hugging_face_llama_directory(tmp_path):
    """Continued pre-training: trainer.init_from converts a local Llama checkpoint; with lr 0 the trained model
    keeps exactly the converted weights, and a mismatched architecture is named."""
    transformers = pytest.importorskip("transformers")
    from models.hf import from_hf

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    shape = ["model.ffn_dim=64", "model.norm_eps=1e-5", "optim.lr=0", "optim.warmup_steps=1",
             f"trainer.init_from={tmp_path / 'llama'}"]
    train.train(smoke(tmp_path / "run", *shape, "trainer.max_steps=1", "model.gate_init=-20"))
    trained, _ = load_model(latest_checkpoint(tmp_path / "run"))
    converted = from_hf(tmp_path / "llama", {"segment_len": 64, "gate_init": -20.0})
    for name, tensor in converted.state_dict().items():
        assert torch.equal(trained.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="dim"):
        train.train(smoke(tmp_path / "bad", *shape, "model.dim=64"))


def test_haystack_scale_reaches_the_model_and_needs_a_memory(tmp_path):
    """data.passkey_haystack_scale: the batch's write_scale reaches the model's memory writes (the first step's loss
    is the loss of model(tokens, None, write_scale) on the same batch and weights), and a model without memory is
    refused before training."""
    from training.data import build_data

    config = smoke(tmp_path, "data.passkey_haystack_scale=16", "trainer.max_steps=1", "optim.lr=0")
    summary = train.train(config)
    typed, _ = train.to_train_config(config)
    model = load_model(latest_checkpoint(tmp_path))[0]  # lr 0: the weights of step 1
    batch = next(build_data(typed.data, load_tokenizer("byte"), 0, 1, segment_len=typed.model.segment_len))
    assert batch["write_scale"].max() > 1
    mask = batch["loss_mask"].flatten()

    def loss(write_scale):
        with torch.no_grad():
            logits = model(batch["tokens"], None, write_scale).logits
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                       reduction="none")
        return float((token_loss * mask).sum() / mask.sum())

    assert summary["losses"][1] == pytest.approx(loss(batch["write_scale"]), rel=1e-5)
    assert abs(loss(None) - loss(batch["write_scale"])) > 1e-6  # the scale changed the loss
    with pytest.raises(ValueError, match="passkey_haystack_scale scales memory writes"):
        train.train(smoke(tmp_path / "local", "data.passkey_haystack_scale=4", "attention=local"))
