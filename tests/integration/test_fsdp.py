"""FSDP2 (and DDP) under torchrun on CPU (gloo): the same training as one process, with sharded
weights, and checkpoints that resume on as many ranks or on another number.

These start several processes; ``-m "not multiprocess"`` leaves them out of a local run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deltatune.distributed.sharded_loading import READ_CHUNK_BYTES
from deltatune.train import ConfigError, load_config, train
from deltatune.train.checks import check_settings
from tiny_models import tiny_chat_model_dir, word_meaning_data

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def setup(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 48)
    return {"model": str(model), "data.path": str(data), "batch_size": 4, "lr": 1e-2, "lora.r": 4,
            "lora.lora_dropout": 0.0, "max_steps": 4, "eval_steps": 2, "seed": 3, "schedule": "cosine",
            "warmup_ratio": 0.0,
            # float32: under bf16 autocast (the default on CPUs with AMX) rows of a 2-row and a
            # 4-row matmul round differently on some CPUs (an Intel Xeon: adapters 0.02 apart after 4 steps)
            "precision": "fp32"}


def _flags(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}" if value else f"--no-{key}"] if isinstance(value, bool) else [f"--{key}", str(value)]
    return flags


def _torchrun(settings: dict, processes: int = 2, timeout: int = 600, env: dict = {}) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "deltatune.cli", "train", *_flags(settings)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=timeout)


def _adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("method,extra", [("lora", {}), ("dora", {}), ("lora", {"gradient_checkpointing": True}),
                                          ("dora", {"fsdp_offload": True}), ("lora", {"quantize": "nf4"}),
                                          ("dora", {"quantize": "nf4"})],
                         ids=["lora", "dora", "lora+checkpointing", "dora+offload", "qlora", "qdora"])
def test_fsdp_on_two_processes_equals_one_process(tmp_path, setup, method, extra):
    """2 ranks x 2 rows, sharded, against 1 process x 4 rows: the same steps, the same adapter."""
    same = {**setup, "method": method, **extra}
    train(load_config(None, {**same, "output_dir": str(tmp_path / "one")}), log=lambda *_: None)
    proc = _torchrun({**same, "batch_size": 2, "distributed": "fsdp", "output_dir": str(tmp_path / "two")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: fsdp over 2 processes" in proc.stdout + proc.stderr
    assert "each rank read only its own rows" in proc.stdout + proc.stderr
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    apart = sum(((a[k] - b[k]).abs() > 1e-6).sum().item() for k in a) / sum(a[k].numel() for k in a)
    print(f"FSDP2 ({method} {extra}, 2 processes) vs 1 process: worst |adapter difference| {worst:.2e}, "
          f"share over 1e-6 {apart:.2%}")
    # Adam's first steps divide a gradient by its own size plus eps (1e-8): an element whose gradient
    # is near eps (seen on a 4-bit base, 5.6e-9) moves by a share of lr that float32 summation order
    # shifts by ~1e-3. So: 99% of the elements within 1e-6, none beyond 1% of one step (lr 1e-2).
    assert apart < 0.01 and worst < 1e-4, (apart, worst)
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [0, 1, 2, 3, 4]
    assert abs(one[-1]["eval_loss"] - two[-1]["eval_loss"]) < 1e-5
    assert (tmp_path / "two" / "best_adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_reduces_once_a_step_and_equals_one_process(tmp_path, setup, strategy):
    """Batches of 1 row accumulated twice per step on 2 ranks (gradients reduced on the second
    micro-batch only): the same as 4 rows in one process."""
    same = {**setup, "group_by_length": False}  # the same rows in each step: 4 at once or 1 + 1 on each rank
    train(load_config(None, {**same, "output_dir": str(tmp_path / "one")}), log=lambda *_: None)
    proc = _torchrun({**same, "batch_size": 1, "grad_accum": 2, "distributed": strategy,
                      "output_dir": str(tmp_path / "two")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_what_fsdp_does_not_run_yet_is_refused_by_name(tmp_path, setup):
    plain = {k: v for k, v in setup.items() if not k.startswith("lora.")}  # no LoRA fields, for --method loha
    for field, value in (("compile", True), ("method", "loha"), ("quantize", "int8"), ("auto_batch", True)):
        cfg = load_config(None, {**plain, "distributed": "fsdp", field: value, "output_dir": str(tmp_path / "x")})
        with pytest.raises(ConfigError, match=f"{field} with distributed fsdp"):
            check_settings(cfg)
    with pytest.raises(ConfigError, match="distributed"):
        check_settings(load_config(None, {**setup, "distributed": "zero3", "output_dir": str(tmp_path / "y")}))
    with pytest.raises(ConfigError, match="fsdp_offload keeps FSDP2's shards in CPU memory"):
        check_settings(load_config(None, {**setup, "distributed": "ddp", "fsdp_offload": True,
                                          "output_dir": str(tmp_path / "z")}))
    with pytest.raises(ConfigError, match="quantize with distributed fsdp"):  # offload asks for FSDP2
        check_settings(load_config(None, {**setup, "fsdp_offload": True, "quantize": "int8",
                                          "output_dir": str(tmp_path / "w")}))


KILLER = r"""
import json, os, signal, sys
from deltatune.train import load_config, train
def kill(info):
    if info.step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
train(load_config(None, json.loads(sys.argv[1])), on_step_end=kill, log=lambda *_: None)
"""


def _killed_at(tmp_path, settings: dict, step: int, processes: int = 2) -> None:
    """Run ``settings`` under torchrun and SIGKILL every rank's process after ``step``."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(script), json.dumps(settings), str(step)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode != 0  # it was killed


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_killed_sharded_run_resumes_bit_identical(tmp_path, setup, dropout):
    """FSDP2 on 2 ranks, checkpoints every 2 steps, SIGKILL after step 3, resumed on 2 ranks."""
    same = {**setup, "batch_size": 2, "distributed": "fsdp", "save_steps": 2, "lora.lora_dropout": dropout}
    whole = _torchrun({**same, "output_dir": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr[-3000:]
    _killed_at(tmp_path, {**same, "output_dir": str(tmp_path / "resumed")}, step=3)
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and (checkpoint / "complete.json").is_file()
    assert not (tmp_path / "resumed" / "adapter").exists()
    resumed = _torchrun({**same, "output_dir": str(tmp_path / "resumed"), "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path, setup):
    """Written by 2 ranks of 2 rows, resumed by one process of 4 rows: the same steps and data."""
    same = {**setup, "save_steps": 2}
    whole = _torchrun({**same, "batch_size": 2, "distributed": "fsdp", "output_dir": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr[-3000:]
    _killed_at(tmp_path, {**same, "batch_size": 2, "distributed": "fsdp", "output_dir": str(tmp_path / "moved")},
               step=3)
    with pytest.raises(ConfigError, match="rows a step"):  # 2 rows in one process: another data order
        train(load_config(None, {**same, "batch_size": 2, "output_dir": str(tmp_path / "moved"), "resume": True}),
              log=lambda *_: None)
    train(load_config(None, {**same, "batch_size": 4, "output_dir": str(tmp_path / "moved"), "resume": True}),
          log=lambda *_: None)
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "moved")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"FSDP2 checkpoint of 2 ranks resumed in 1 process: worst |adapter difference| {worst:.2e}")
    assert worst < 1e-5, worst


def _larger_model_dir(folder, tokenizer):
    """A random Llama of about 195 MB of float32 weights: large against the runtime's own memory,
    so that a whole copy of it would show in a rank's resident size while loading."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LOADER = r"""
import json, resource, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoTokenizer, LlamaForCausalLM  # the modeling code, imported before measuring
from deltatune.adapter_ops import add_adapter
from deltatune.config import LoraConfig
from deltatune.distributed import Distributed
from deltatune.distributed.sharded_loading import fill_shards, keep_real_tensors, load_skeleton
from deltatune.loading import load_model
from deltatune.quant.convert import QuantizeConfig
from deltatune.quant.layers import Linear4bit

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

dist.init_process_group("gloo")
folder, mode, quantize = sys.argv[1], sys.argv[2], sys.argv[4] or None
AutoTokenizer.from_pretrained(folder)  # the tokenizer's memory stays out of the measure
before = peak_mib()
if mode == "sharded":
    model, _, source = load_skeleton(folder, quant=QuantizeConfig(quantize) if quantize else None)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"), "default")
    keep_real_tensors(model, source)
    Distributed(dist.get_rank(), dist.get_world_size(), strategy="fsdp").wrap(model, model.model.layers)
    fill_shards(model, model, source, dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    held = [p.to_local() for p in model.parameters()]
else:
    model, _ = load_model(folder, quantize=quantize)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"), "default")
    held = list(model.parameters()) + [m.weight for m in model.modules() if isinstance(m, Linear4bit)]
touched = sum(float(t.float().sum()) for t in held)  # every byte a rank holds is read once
with open(f"{sys.argv[3]}/rank{dist.get_rank()}-{mode}.json", "w") as out:  # printed lines can interleave
    json.dump({"rank": dist.get_rank(), "grown_mib": peak_mib() - before,
               "model_mib": sum(t.numel() * t.element_size() for t in held) / 2**20}, out)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("quantize", ["", "nf4"], ids=["float32", "nf4"])
def test_no_rank_holds_the_whole_model_while_loading(tmp_path, default_tokenizer, quantize):
    """Loaded into 2 FSDP2 shards, each rank's peak grows by about half the model's bytes; loaded
    whole (as DDP does), by at least the whole model, so the measure would see a whole copy. With
    ``nf4`` each rank quantizes its own rows: the model is its 4-bit size, and still split in two.
    glibc is told to return freed memory at once, so the peak follows the bytes actually held."""
    model = _larger_model_dir(tmp_path / "larger", default_tokenizer)
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    grown, whole_mib = {}, 0.0
    for mode in ("sharded", "whole"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), str(model), mode, str(tmp_path), quantize], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                           "MALLOC_MMAP_THRESHOLD_": "131072"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"rank{rank}-{mode}.json").read_text()) for rank in range(2)]
        grown[mode] = [r["grown_mib"] for r in ranks]
        if mode == "whole":
            whole_mib = ranks[0]["model_mib"]  # the bytes of one whole copy (4-bit layers as packed)
    print(f"model {whole_mib:.0f} MiB ({quantize or 'float32'}); each rank's peak grew while loading by "
          f"{grown['sharded']} MiB in shards, {grown['whole']} MiB whole")
    assert len(grown["sharded"]) == len(grown["whole"]) == 2
    assert min(grown["whole"]) >= 0.9 * whole_mib, grown
    # half the model, one chunk of rows being read, and up to 15% of the model for the rest (4-bit:
    # a layer's quantization workspace); the 4-bit model is small (108 MiB, 96 of them its float32
    # embedding), so the fixed chunk is a large share of it. Still well below a whole copy:
    limit = 0.5 * whole_mib + READ_CHUNK_BYTES / 2**20 + 0.15 * whole_mib
    assert limit < 0.9 * whole_mib
    assert max(grown["sharded"]) < limit, grown


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_equal_one_process(tmp_path, setup):
    """Two torchrun "nodes" of one process each, meeting by c10d rendezvous on 127.0.0.1 (the
    command a two-machine run uses), train the same adapter as one process of both batches."""
    same = {**setup, "max_steps": 2, "eval_steps": 2}
    train(load_config(None, {**same, "output_dir": str(tmp_path / "one")}), log=lambda *_: None)
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "loopback",
                               "-m", "deltatune.cli", "train", *_flags({**same, "batch_size": 2,
                                                                         "distributed": "fsdp",
                                                                         "output_dir": str(tmp_path / "two")})],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    assert any("distributed: fsdp over 2 processes" in o for o in outputs)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"two loopback nodes vs 1 process: worst |adapter difference| {worst:.2e}")
    assert worst < 1e-5, worst


SHARDED_4BIT = r"""
import json, sys
import torch
import torch.distributed as dist
from deltatune.adapter_ops import add_adapter
from deltatune.config import LoraConfig
from deltatune.distributed import Distributed
from deltatune.distributed.sharded_loading import fill_shards, keep_real_tensors, load_skeleton
from deltatune.loading import load_model
from deltatune.quant.convert import QuantizeConfig
from deltatune.quant.layers import Linear4bit

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
folder, out, how, quant_type, double = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "double"
one, _ = load_model(folder, quantize=quant_type, quant_double=double)  # what one process holds
whole = {n: (m.weight.clone(), m.quant_state) for n, m in one.named_modules() if isinstance(m, Linear4bit)}
lora = LoraConfig(r=4, target_modules="all-linear", use_dora=True)
add_adapter(one, lora, "default")
magnitudes = {n: p.detach().clone() for n, p in one.named_parameters() if "magnitude" in n}
if how != "wrap":  # quantized from each rank's rows (or, saved quantized, read), as deltatune train loads
    model, _, source = load_skeleton(folder, quant=QuantizeConfig(quant_type, double_quant=double))
    add_adapter(model, lora, "default")
    keep_real_tensors(model, source)
else:  # loaded and quantized whole, then sharded
    model = load_model(folder, quantize=quant_type, quant_double=double)[0]
    add_adapter(model, lora, "default")
Distributed(rank, world, strategy="fsdp").wrap(model, model.model.layers)
if how != "wrap":
    fill_shards(model, model, source, rank, world, torch.device("cpu"))
    assert bool(source.saved_4bit) == (how == "saved")
held = total = 0
for name, layer in model.named_modules():
    if isinstance(layer, Linear4bit):
        packed, state = whole[name.replace(".base_layer", "")]
        scales = state.absmax
        held += layer.weight.to_local().numel() + layer.absmax.to_local().numel()
        total += packed.numel() + scales.numel() * scales.element_size()
        assert torch.equal(layer.weight.full_tensor(), packed), name  # gathered: the same bytes
        assert torch.equal(layer.absmax.full_tensor().view(scales.dtype), scales), name
        if state.nested is not None:
            mine = layer.quant_state.nested
            assert torch.equal(mine.absmax, state.nested.absmax) and torch.equal(mine.offset, state.nested.offset)
        assert layer.quant_state.dtype == state.dtype, name
for name, param in model.named_parameters():
    if name in magnitudes:
        assert torch.equal(param.full_tensor(), magnitudes[name]), name
with open(f"{out}/rank{rank}.json", "w") as handle:  # one file a rank: printed lines can interleave
    json.dump({"rank": rank, "held": held, "total": total, "layers": len(whole), "magnitudes": len(magnitudes)},
              handle)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("how,quant_type,double", [("wrap", "nf4", "double"), ("skeleton", "nf4", "double"),
                                                   ("skeleton", "fp4", "single"), ("saved", "nf4", "double"),
                                                   ("saved", "fp4", "single")])
def test_a_4bit_base_is_sharded_bytes_and_scales(tmp_path, setup, how, quant_type, double):
    """Under FSDP2 each 4-bit layer's packed bytes and block scales are split across the ranks
    (each holds half) and gather back to exactly the bytes one process holds, DoRA's magnitudes
    too: whether the base was quantized whole and then sharded, or quantized from each rank's
    rows of the checkpoint (``skeleton``, what deltatune train does), or read as saved by a
    checkpoint already in 4 bits (``saved``)."""
    from deltatune.loading import load_model
    from deltatune.quant import save_model

    model = setup["model"]
    if how == "saved":
        quantized, tokenizer = load_model(model, quantize=quant_type, quant_double=double == "double")
        model = str(save_model(quantized, tmp_path / "saved", tokenizer))
    script = tmp_path / "sharded_4bit.py"
    script.write_text(SHARDED_4BIT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), model, str(tmp_path), how, quant_type, double],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert len(ranks) == 2 and all(r["layers"] > 0 and r["magnitudes"] > 0 for r in ranks)
    assert sum(r["held"] for r in ranks) == ranks[0]["total"]  # every byte held once, by one rank
    assert all(r["held"] <= 0.55 * r["total"] for r in ranks), ranks
