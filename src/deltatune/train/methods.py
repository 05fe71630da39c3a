"""``deltatune train --method NAME``: each method's config class, its settings for a training
run (where they differ from the config class's defaults) and its usual learning rate."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import CONFIG_REGISTRY, AdapterConfig, LoraConfig
from ..config.cpt import context_from_examples
from .config import ConfigError, TrainConfig
from .moe import lora_config_fields


@dataclass(frozen=True)
class MethodRecipe:
    """What ``deltatune train --method NAME`` uses unless told otherwise."""

    peft_type: str
    lr: float
    options: dict[str, Any] = field(default_factory=dict)
    epochs: float = 3.0  # passes over the data when neither --epochs nor --max-steps is given
    schedule: str = "cosine"  # when --schedule is not given
    # with the recipe's epochs: more passes, up to MAX_EPOCHS, until a run reads this many tokens
    min_tokens: int = 0


MAX_EPOCHS = 3.0  # the most passes min_tokens adds


RECIPES: dict[str, MethodRecipe] = {
    # LoRA: one epoch at 1e-3, cosine after warm-up, and at least 24k tokens (a small set gets
    # up to three passes): chosen on the validation splits of the default job and the docstring
    # task (benchmarks/sweep_defaults.py, docs/training.md)
    "lora": MethodRecipe("LORA", 1e-3, epochs=1.0, min_tokens=24_000),
    # DyLoRA/QDyLoRA: LoRA's recipe; every step trains a rank drawn from 1..r (adapters/low_rank/dylora.py).
    # Its rate confirmed on validation data by `deltatune compare --lr-search 4 --lr-search-tries 3`
    # (benchmarks/compare-cpu-catalogue.json): 1e-3 (4e-3 and 2.5e-4 were worse)
    "dylora": MethodRecipe("DYLORA", 1e-3, epochs=1.0, min_tokens=24_000),
    "dora": MethodRecipe("LORA", 2e-4, {"use_dora": True}),
    # LoHa, LoKr and AdaLoRA at 4e-3: chosen over 1e-3 by validation loss (benchmarks/choose_lr.py)
    "loha": MethodRecipe("LOHA", 4e-3, {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    "lokr": MethodRecipe("LOKR", 4e-3, {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    "adalora": MethodRecipe("ADALORA", 4e-3, {"init_r": 12, "target_r": 8, "lora_alpha": 32,
                                              "target_modules": "all-linear", "deltaT": 5}),
    "ia3": MethodRecipe("IA3", 3e-3),
    "vera": MethodRecipe("VERA", 1e-2, {"r": 256, "target_modules": "all-linear"}),
    # HiRA: r=32 on q/v (the architecture's default targets), no dropout (PEFT's MetaMathQA experiment
    # hira/llama-3.2-3B-rank32-lr4.5e-3, weight decay 0 there). Rate chosen on validation data from that
    # experiment's 4.5e-3 by `deltatune compare --lr-search 4 --lr-search-tries 3`
    # (benchmarks/compare-cpu-catalogue.json): 1.8e-2 (7.2e-2 diverged)
    "hira": MethodRecipe("HIRA", 1.8e-2, {"r": 32}),
    # Lily: r=448, scaling 8, num_B 2, stride_A 14 (two A groups on Llama-3.2-3B's 28 layers) on q/v (the
    # architecture's default targets) at that benchmark's default rate 1e-4 (PEFT's MetaMathQA experiment
    # lily/llama-3.2-3B-rank448-a2-b2-s8.0). Rate chosen on validation data from that 1e-4 by `deltatune compare
    # --lr-search 8 --lr-search-tries 3` (benchmarks/compare-cpu-catalogue.json): 8e-4 (6.4e-3 diverged)
    "lily": MethodRecipe("LILY", 8e-4, {"r": 448, "scaling": 8.0, "stride_A": 14, "num_B": 2}),
    # PVeRA: VeRA's settings above (PVeRA is VeRA with a sampled middle; PEFT ships no PVeRA example),
    # generator_seed set so a run's noise is reproducible. Rate chosen on validation data from VeRA's 1e-2 by
    # `deltatune compare --lr-search 4 --lr-search-tries 3` (benchmarks/compare-cpu-catalogue.json): 4e-2
    # (1.6e-1 diverged)
    "pvera": MethodRecipe("PVERA", 4e-2, {"r": 256, "target_modules": "all-linear", "generator_seed": 0}),
    # WaveFT: PEFT's MetaMathQA experiment waveft/llama-3.2-3B-default: the config's defaults (2592
    # coefficients, scaling 25, db1 on q/v). Rate chosen on validation data from that benchmark's default 1e-4
    # by `deltatune compare --lr-search 8 --lr-search-tries 2` (benchmarks/compare-cpu-catalogue.json): 8e-4,
    # the walk's second and last rate, still improving
    "waveft": MethodRecipe("WAVEFT", 8e-4, {"n_frequency": 2592, "scaling": 25.0, "wavelet_family": "db1"}),
    "nola": MethodRecipe("NOLA", 5e-3, {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    # RoAd: road_2, groups of 64 on q/v (PEFT's docs and its MetaMathQA experiment
    # road/llama-3.2-3B-lr_0.001). Rate chosen on validation data from that 1e-3 by `deltatune compare
    # --lr-search 4` (benchmarks/compare-cpu-catalogue.json): 6.4e-2, the walk's fourth and last rate,
    # still improving
    "road": MethodRecipe("ROAD", 6.4e-2, {"variant": "road_2", "group_size": 64}),
    # DeLoRA: r=32, lambda 15, module_dropout 0.1 on q/v (PEFT's examples/delora_finetuning, lr 3e-3:
    # "10-100x larger learning rate than LoRA"). Rate chosen on validation data from that 3e-3 by
    # `deltatune compare --lr-search 4` (benchmarks/compare-cpu-catalogue.json): 1.88e-4, the walk's fourth and
    # last rate (downwards), still improving
    "delora": MethodRecipe("DELORA", 1.88e-4, {"r": 32, "delora_lambda": 15, "module_dropout": 0.1}),
    # RandLoRA: r=32, alpha 640 (20x r), dropout 0.05 (PEFT's examples/randlora_finetuning, which
    # targets k/v; here the architecture's default targets). Rate chosen on validation data from that
    # example's 3e-4 by `deltatune compare --lr-search 4` (benchmarks/compare-cpu-catalogue.json): 1.2e-3
    # (4.8e-3 was worse)
    "randlora": MethodRecipe("RANDLORA", 1.2e-3, {"r": 32, "randlora_alpha": 640, "randlora_dropout": 0.05}),
    # VB-LoRA: r=4, top-2 of 256 vectors on q/v (PEFT's MetaMathQA experiment
    # vblora/llama-3.2-3B-bank1024-lr5e4); vectors of 64, not 256, so that SmolLM2's sizes (576, 192)
    # divide. Rate chosen on validation data from that experiment's 5e-4 by `deltatune compare --lr-search 4`
    # (benchmarks/compare-cpu-catalogue.json): 3.2e-2, the walk's fourth and last rate, still improving
    "vblora": MethodRecipe("VBLORA", 3.2e-2, {"r": 4, "num_vectors": 256, "vector_length": 64, "topk": 2}),
    # GraLoRA: r=32, alpha 64, gralora_k 2 on q/v (PEFT's MetaMathQA comparison gralora/llama-3.2-3B-rank32).
    # Rate chosen on validation data from that experiment's 2e-4 by `deltatune compare --lr-search 4
    # --lr-search-tries 3` (benchmarks/compare-cpu-catalogue.json): 3.2e-3, the walk's third and last rate,
    # still improving
    "gralora": MethodRecipe("GRALORA", 3.2e-3, {"r": 32, "alpha": 64, "gralora_k": 2}),
    # Uni-LoRA: r=4, one vector of 131072 on q/v (PEFT's MetaMathQA comparison
    # unilora/llama-3.2-3B-r4-td131072-lr0.002). Rate chosen on validation data from that experiment's 2e-3
    # by `deltatune compare --lr-search 4 --lr-search-tries 3` (benchmarks/compare-cpu-catalogue.json):
    # 3.2e-2, the walk's third and last rate, still improving
    "unilora": MethodRecipe("UNILORA", 3.2e-2, {"r": 4, "theta_d_length": 131072}),
    # TinyLoRA: r=2, u=64, no weight tying on q/v at the comparison's shared lr 1e-4 (PEFT's MetaMathQA
    # comparison tinylora/llama-3.2-3B-default; its weight_tying=1.0 variant ran at 1e-3). Rate chosen on
    # validation data from that 1e-4 by two walks of `deltatune compare --lr-search 8 --lr-search-tries 2`
    # (1e-4 then 8e-4; benchmarks/compare-cpu-catalogue.json): 6.4e-3, the last rate, still improving
    "tinylora": MethodRecipe("TINYLORA", 6.4e-3, {"r": 2, "u": 64, "weight_tying": 0.0}),
    # DEFT: r=32, alpha 128, relu projection on q/v, at the comparison's shared lr 1e-4 (PEFT's
    # MetaMathQA comparison deft/llama-3.2-3B-rank32). Rate chosen on validation data from that 1e-4 by
    # `deltatune compare --lr-search 8 --lr-search-tries 2` (benchmarks/compare-cpu-catalogue.json): 8e-4,
    # the walk's second and last rate, still improving
    "deft": MethodRecipe("DEFT", 8e-4, {"r": 32, "alpha": 128}),
    # PEANuT: r=32, depth 2, relu, scaling 2 on q/v, at the comparison's shared lr 1e-4 (PEFT's
    # MetaMathQA comparison peanut/llama-3.2-3B-rank32-relu-depth2-s2.0). Rate chosen on validation data from
    # that 1e-4 by `deltatune compare --lr-search 8 --lr-search-tries 2` (benchmarks/compare-cpu-catalogue.json):
    # 8e-4, the walk's second and last rate, still improving
    "peanut": MethodRecipe("PEANUT", 8e-4, {"r": 32, "depth": 2, "act_fn": "relu", "scaling": 2.0}),
    "bottleneck": MethodRecipe("BOTTLENECK", 1e-3, {"variant": "houlsby", "reduction_factor": 16}),
    "pfeiffer": MethodRecipe("BOTTLENECK", 1e-3, {"variant": "pfeiffer", "reduction_factor": 16}),
    "prompt_tuning": MethodRecipe("PROMPT_TUNING", 3e-2, {"num_virtual_tokens": 20,
                                                           "prompt_tuning_init": "SAMPLE_VOCAB"}),
    "prefix_tuning": MethodRecipe("PREFIX_TUNING", 1e-2, {"num_virtual_tokens": 20}),
    # Cartridges: prefix tuning's recipe (PEFT ships no Cartridges example), the first token frozen as an
    # attention sink (the paper's advice, quoted in PEFT's CartridgeConfig). Rate chosen on validation data from
    # prefix tuning's 1e-2 by `deltatune compare --lr-search 4 --lr-search-tries 2`
    # (benchmarks/compare-cpu-catalogue.json): 4e-2, the walk's second and last rate, still improving
    "cartridge": MethodRecipe("CARTRIDGE", 4e-2, {"num_virtual_tokens": 20, "num_frozen_tokens": 1}),
    "p_tuning": MethodRecipe("P_TUNING", 1e-3, {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    "bitfit": MethodRecipe("SELECTIVE", 1e-3, {"bitfit": True}),
    "top_layers": MethodRecipe("SELECTIVE", 1e-4, {"top_k_layers": 1}),
    # LN tuning: PEFT's norms per architecture, as PEFT's MetaMathQA comparison runs it
    # (method_comparison/MetaMathQA/experiments/ln_tuning/llama-3.2-3B-default); the rate chosen on
    # validation data from that benchmark's 1e-4 by `deltatune compare --lr-search 4`
    # (benchmarks/compare-cpu-catalogue.json): 6.4e-3, the walk's fourth and last rate, still improving
    "ln_tuning": MethodRecipe("LN_TUNING", 6.4e-3),
    # Trainable tokens: the rows of --adapter '{token_indices: [...]}' (required). PEFT publishes no
    # rate for it. Chosen on validation data from LoRA's 1e-3 by `deltatune compare --lr-search 4
    # --lr-search-tries 2` with token_indices [1, 2] (benchmarks/compare-cpu-catalogue.json): 4e-3, the
    # second and last rate tried, still improving
    "trainable_tokens": MethodRecipe("TRAINABLE_TOKENS", 4e-3),
    # LLaMA-Adapter (arXiv:2303.16199): lr 9e-3 and prompts of length 10 in the top 30 of LLaMA-7B's
    # 32 layers; adapter_layers left unset means every layer here (the default model has 30). Rate
    # chosen on validation data from the paper's 9e-3 by `deltatune compare --lr-search 4`
    # (benchmarks/compare-cpu-catalogue.json): 3.6e-2 (1.44e-1 diverged)
    "adaption_prompt": MethodRecipe("ADAPTION_PROMPT", 3.6e-2, {"adapter_len": 10}),
    # BEFT: value-projection bias vectors (PEFT's default targets). PEFT's docs give no learning
    # rate; the walk started from 3e-3, the other vector-only recipe here ((IA)³). Rate chosen on validation
    # data by `deltatune compare --lr-search 4 --lr-search-tries 2` (benchmarks/compare-cpu-catalogue.json):
    # 1.2e-2, the walk's second and last rate, still improving
    "beft": MethodRecipe("BEFT", 1.2e-2),
    # FourierFT: n_frequency 1000 and scaling 300 on q/v as in PEFT's MetaMathQA comparison
    # (method_comparison/MetaMathQA/experiments/fourierft). Rate chosen on validation data from its 1e-3
    # by `deltatune compare --lr-search 4` (benchmarks/compare-cpu-catalogue.json): 6.4e-2, the walk's
    # fourth and last rate, still improving
    "fourierft": MethodRecipe("FOURIERFT", 6.4e-2, {"n_frequency": 1000, "scaling": 300.0,
                                                  "target_modules": ["q_proj", "v_proj"]}),
    # SHiRA: r 32, random_seed 42 on q/v as in PEFT's MetaMathQA comparison
    # (method_comparison/MetaMathQA/experiments/shira/llama-3.2-3B-lr_0.0003-random_seed_42). Rate chosen on
    # validation data from that experiment's 3e-4 by `deltatune compare --lr-search 4`
    # (benchmarks/compare-cpu-catalogue.json): 4.8e-3 (1.92e-2 was worse)
    "shira": MethodRecipe("SHIRA", 4.8e-3, {"r": 32, "random_seed": 42, "target_modules": ["q_proj", "v_proj"]}),
    # Super-Tuning: sparsity 0.974, the largest entries, on q/v as in PEFT's MetaMathQA comparison
    # (method_comparison/MetaMathQA/experiments/supertuning/llama-3.2-3B-s974-topk, the benchmark's lr 1e-4;
    # Supra with --adapter '{r: 8}' as in its s99-supra-r8). Rate chosen on validation data from that 1e-4 by
    # `deltatune compare --lr-search 8 --lr-search-tries 3` (benchmarks/compare-cpu-catalogue.json): 6.4e-3,
    # the walk's third and last rate, still improving
    "supertuning": MethodRecipe("SUPERTUNING", 6.4e-3, {"sparsity": 0.974, "target_modules": ["q_proj", "v_proj"]}),
    # GLoRA: r 8, the default forms (lora A/B and C, constant D/E) on q/v as in PEFT's MetaMathQA comparison
    # (method_comparison/MetaMathQA/experiments/glora/llama-3.2-3B-default). Rate chosen on validation data from
    # the benchmark's 1e-4 by `deltatune compare --lr-search 8 --lr-search-tries 2`
    # (benchmarks/compare-cpu-catalogue.json): 8e-4, the walk's second and last rate, still improving
    "glora": MethodRecipe("GLORA", 8e-4, {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    # MiSS: r 64, the balanced (default) variant on q/v as in PEFT's MetaMathQA comparison
    # (method_comparison/MetaMathQA/experiments/miss/llama-3.2-3B-default). Rate chosen on validation data from
    # that benchmark's 1e-4 by `deltatune compare --lr-search 4` (benchmarks/compare-cpu-catalogue.json): 1.6e-3
    # (6.4e-3 was worse)
    "miss": MethodRecipe("MISS", 1.6e-3, {"r": 64, "target_modules": ["q_proj", "v_proj"]}),
    # C3A: block_size 64, xavier-uniform start on q/v as in PEFT's MetaMathQA comparison
    # (method_comparison/MetaMathQA/experiments/c3a/llama-3.2-3B-default, lr 3e-1; its weight decay 1e-5 is not
    # part of a recipe); the update is divided by the input size, hence the large rate. Rate chosen on
    # validation data from that 3e-1 by `deltatune compare --lr-search 4` (benchmarks/compare-cpu-catalogue.json):
    # 4.8 (19.2 was worse)
    "c3a": MethodRecipe("C3A", 4.8, {"block_size": 64, "init_weights": "xavier_uniform",
                                      "target_modules": ["q_proj", "v_proj"]}),
    # OFT, BOFT, HRA: the settings of PEFT's MetaMathQA comparison (method_comparison/MetaMathQA/
    # experiments: oft/llama-3.2-3B-rank32 = 32 blocks per layer on q/v, boft/llama-3.2-3B-default =
    # blocks of 4, one butterfly factor, hra/llama-3.2-3B-rank32 = 32 reflections, both on the default
    # targets). Rates chosen on validation data, starting from that comparison's 1e-4, by
    # `deltatune compare --lr-search 4` (benchmarks/compare-cpu-catalogue.json): OFT and BOFT 6.4e-3
    # (the walk's fourth and last rate, still improving), HRA 1.6e-3 (6.4e-3 was worse)
    "oft": MethodRecipe("OFT", 6.4e-3, {"r": 32, "oft_block_size": 0, "target_modules": ["q_proj", "v_proj"]}),
    "boft": MethodRecipe("BOFT", 6.4e-3, {"boft_block_size": 4, "boft_n_butterfly_factor": 1}),
    "hra": MethodRecipe("HRA", 1.6e-3, {"r": 32}),
    # PSOFT: r=128, alpha 128, exact Cayley, both vectors on the default targets, at the comparison's
    # shared lr 1e-4 (PEFT's MetaMathQA comparison psoft/llama-3.2-3B-r128; its default experiment's r=256
    # exceeds SmolLM2's 192-wide k/v projections). Rate chosen on validation data from that 1e-4 by
    # `deltatune compare --lr-search 8 --lr-search-tries 2` (benchmarks/compare-cpu-catalogue.json): 8e-4,
    # the walk's second and last rate, still improving
    "psoft": MethodRecipe("PSOFT", 8e-4, {"r": 128, "psoft_alpha": 128}),
    # AdaMSS: R=100, 32 subspaces of rank 1, orthogonal start, no ASA, lr 1e-4 (PEFT's MetaMathQA comparison
    # adamss/llama-3.2-3B-rank32). Rate chosen on validation data from that 1e-4 by two walks of `deltatune
    # compare --lr-search 8 --lr-search-tries 2` (1e-4 then 8e-4; benchmarks/compare-cpu-catalogue.json):
    # 6.4e-3, the last rate, still improving
    "adamss": MethodRecipe("ADAMSS", 6.4e-3, {"r": 100, "num_subspaces": 32, "subspace_rank": 1}),
    # FRoD: sparse_rate 0.01 on the default targets (q/v) at the comparison's shared lr 1e-4 (PEFT's MetaMathQA
    # comparison frod/llama-3.2-3B-default; its runtime_offload_base_weight changes no value). Rate chosen on
    # validation data from that 1e-4 by `deltatune compare --lr-search 8 --lr-search-tries 2`
    # (benchmarks/compare-cpu-catalogue.json): 8e-4, the walk's second and last rate, still improving
    "frod": MethodRecipe("FROD", 8e-4, {"sparse_rate": 0.01}),
    # OSF: PEFT's continual-learning example (examples/orthogonal_subspace_learning: Llama-3.1-8B-Instruct,
    # the seven projections = the architecture's default targets, lr 5e-6, 2 epochs; its middle task keeps
    # effective_rank 0.5 frozen); the trained half of each SVD is a full-rank-like update, hence the low
    # rate. Rate chosen on validation data from the example's 5e-6 by `deltatune compare --lr-search 8
    # --lr-search-tries 3` (benchmarks/compare-cpu-catalogue.json): 4e-5 (3.2e-4 was worse)
    "osf": MethodRecipe("OSF", 4e-5, {"effective_rank": 0.5}, epochs=2.0),
    # X-LoRA: mixes existing LoRA adapters, which --adapter must name (name -> adapter folder):
    # --adapter '{adapters: {"0": out/a/adapter, "1": out/b/adapter}}' (without them the config says so).
    # PEFT's defaults (a one-layer classifier, softmax over the experts, frozen experts). Rate chosen on
    # validation data from deltatune's LoRA rate 1e-3 by `deltatune compare --lr-search 4 --lr-search-tries 2`
    # with benchmarks/xlora_experts.py's two experts (benchmarks/compare-cpu-catalogue.json): 4e-3, the
    # second and last rate tried, still improving
    "xlora": MethodRecipe("XLORA", 4e-3),
    # Poly / MHR: PEFT's Poly example (examples/poly/peft_poly_seq2seq_with_generate.ipynb: r=8, 2 skills,
    # 4 heads) with one task (the default job's records carry no task id: every row is task 0). Rate chosen
    # on validation data from the example's 5e-5 by `deltatune compare --lr-search 8 --lr-search-tries 3`
    # (benchmarks/compare-cpu-catalogue.json): 3.2e-3, the walk's third and last rate, still improving
    "poly": MethodRecipe("POLY", 3.2e-3, {"r": 8, "n_skills": 2, "n_splits": 4, "n_tasks": 1}),
    # Multitask prompt tuning: 50 virtual tokens as PEFT's example (examples/conditional_generation/
    # multitask_prompt_tuning.ipynb, which starts from a TEXT prompt) with prompt tuning's SAMPLE_VOCAB start and
    # one task (every row is task 0). Rate chosen on validation data from prompt tuning's 3e-2 by `deltatune
    # compare --lr-search 4 --lr-search-tries 2` (benchmarks/compare-cpu-catalogue.json): 1.2e-1, the walk's
    # second and last rate, still improving
    "multitask_prompt_tuning": MethodRecipe("MULTITASK_PROMPT_TUNING", 1.2e-1, {
        "num_virtual_tokens": 50, "prompt_tuning_init": "SAMPLE_VOCAB", "num_tasks": 1, "num_ranks": 1}),
    # CPT: PEFT's example (examples/cpt_finetuning/cpt_train_and_inference.ipynb: lr 1e-4, 5 epochs, decay
    # 0.95, input radius 0.2, template radius 0.1); its context is the first CPT_CONTEXT_EXAMPLES training
    # examples (adapter_config builds cpt_token_ids from them unless --adapter gives them). Rate chosen on
    # validation data from the example's 1e-4 by `deltatune compare --lr-search 4 --lr-search-tries 2`
    # (benchmarks/compare-cpu-catalogue.json): 4e-4, the walk's second and last rate, still improving
    "cpt": MethodRecipe("CPT", 4e-4, {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.95,
                                      "opt_projection_epsilon": 0.2, "opt_projection_format_epsilon": 0.1},
                        epochs=5.0),
    # ShadowPEFT: PEFT's MetaMathQA experiment shadow/llama-3.2-3B-default (every block, r=8, alpha 0.1,
    # shadow loss 0.05, a one-layer backbone 32 wide with a 256 MLP) at that benchmark's default rate 1e-4,
    # with 3 attention heads instead of 8 so that SmolLM2's 3 key/value heads divide them. Rate chosen on
    # validation data from that benchmark's 1e-4 by `deltatune compare --lr-search 8 --lr-search-tries 3`
    # (benchmarks/compare-cpu-catalogue.json): 6.4e-3, the walk's third and last rate, still improving
    "shadow": MethodRecipe("SHADOW", 6.4e-3, {"r": 8, "shadow_alpha": 0.1, "auxiliary_loss_weight": 0.05,
                                            "shadow_num_hidden_layers": 1, "shadow_hidden_size": 32,
                                            "shadow_intermediate_size": 256, "shadow_num_attention_heads": 3}),
}


def recipe_for(cfg: TrainConfig) -> MethodRecipe:
    name = cfg.method.lower()
    if name not in RECIPES:
        raise ConfigError(f"method: {cfg.method!r} is not known; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    if recipe.peft_type not in CONFIG_REGISTRY:
        raise ConfigError(f"method: {cfg.method!r} is not available in this build")
    return recipe


def adapter_config(cfg: TrainConfig, task_type: str, total_steps: int, examples: Sequence[Any] = ()) -> AdapterConfig:
    """The adapter config of a run: the recipe's settings, then ``lora``/``adapter`` options.
    ``examples``: the tokenized training rows, for settings made from data (CPT's context)."""
    recipe = recipe_for(cfg)
    cls = CONFIG_REGISTRY[recipe.peft_type]
    if issubclass(cls, LoraConfig):  # LoRA and DyLoRA take the lora group's settings
        options = {**lora_config_fields(cfg.lora), **recipe.options, **cfg.adapter}  # presets: train/moe.py
    else:
        if cfg.lora != type(cfg.lora)():
            raise ConfigError(f"lora.*: settings of the lora group do not apply to --method {cfg.method}; "
                              "use --adapter '{field: value}' (the method's config fields)")
        options = {**recipe.options, **cfg.adapter}
    if recipe.peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "CARTRIDGE",
                            "MULTITASK_PROMPT_TUNING", "CPT") and cfg.data.packing:
        raise ConfigError(f"data.packing: --method {cfg.method} puts virtual tokens before each sequence; "
                          "packed rows would share them, so packing is not supported with soft prompts")
    if recipe.peft_type == "ADALORA":
        options.setdefault("total_step", total_steps)
        options.setdefault("tinit", total_steps // 10)
        options.setdefault("tfinal", total_steps // 5)
    if recipe.peft_type == "DYLORA":
        options.setdefault("rank_seed", cfg.seed)
    if recipe.peft_type in TASK_COUNT_FIELDS:
        _task_count_from_data(options, TASK_COUNT_FIELDS[recipe.peft_type], cfg, examples)
    if recipe.peft_type == "CPT" and "cpt_token_ids" not in options and examples:
        for key, value in _cpt_context(examples, cfg.data.max_seq_len).items():
            options.setdefault(key, value)
    if recipe.peft_type == "TRAINABLE_TOKENS" and not options.get("token_indices"):
        raise ConfigError(f"adapter: --method {cfg.method} trains the embedding rows of the tokens you name; give "
                          "their ids, e.g. --adapter '{token_indices: [1, 2]}' (the tokenizer's input_ids of them)")
    known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"adapter: {cls.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    options["task_type"] = task_type
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter: {err}") from None


TASK_COUNT_FIELDS = {"POLY": "n_tasks", "MULTITASK_PROMPT_TUNING": "num_tasks"}


def _task_count_from_data(options: dict, field_name: str, cfg: TrainConfig, examples: Sequence[Any]) -> None:
    """A task-routed method's task count: one more than the largest id of the data's task_id
    column unless --adapter gives it; a given count too small for the data is an error."""
    ids = [i for i in (getattr(e, "task_id", None) for e in examples) if i is not None]
    if not ids:
        return
    needed = max(ids) + 1
    if field_name not in cfg.adapter:
        options[field_name] = needed
    elif options[field_name] < needed:
        raise ConfigError(f"adapter: {field_name}={options[field_name]}, but the task_id column of {cfg.data.path} "
                          f"holds task {needed - 1}; give --adapter '{{{field_name}: {needed}}}' or more")


CPT_CONTEXT_EXAMPLES = 4  # PEFT's example puts 10 before each row; 4 keeps the default job's CPU runs short


def _cpt_context(examples: Sequence[Any], max_seq_len: int) -> dict[str, list[int]]:
    """CPT's context from the first training examples (``config.cpt.context_from_examples``)."""
    context = context_from_examples(examples, CPT_CONTEXT_EXAMPLES)
    if not any(t % 4 == 2 for t in context["cpt_tokens_type_mask"]):  # no prompt token: nothing would train
        raise ConfigError("adapter: --method cpt trains the prompt (input) tokens of its context, and the first "
                          f"{CPT_CONTEXT_EXAMPLES} training rows have none (text records, or data.train_on_prompt); "
                          "use prompt/completion or chat data without train_on_prompt, or give the context with "
                          "--adapter '{cpt_token_ids: [...], cpt_tokens_type_mask: [...]}'")
    total = len(context["cpt_token_ids"])
    if total > max_seq_len:  # the context goes before every row
        raise ConfigError(f"adapter: CPT's context from the first {CPT_CONTEXT_EXAMPLES} training rows is {total} "
                          f"tokens, more than data.max_seq_len={max_seq_len}; give a shorter one with "
                          "--adapter '{cpt_token_ids: [...], cpt_tokens_type_mask: [...]}'")
    return context


def learning_rate(cfg: TrainConfig) -> float:
    """``cfg.lr``, or the method's usual rate when it is 0."""
    return cfg.lr or recipe_for(cfg).lr


def schedule_for(cfg: TrainConfig) -> str:
    """``cfg.schedule``, or the method's usual schedule when it is empty."""
    return cfg.schedule or recipe_for(cfg).schedule


def epochs_for(cfg: TrainConfig, epoch_tokens: int = 0) -> float:
    """``cfg.epochs``, or when it is 0 the method's usual number of passes, raised (to at most
    ``MAX_EPOCHS`` whole passes) until the run reads the recipe's ``min_tokens`` when one epoch
    is ``epoch_tokens`` tokens."""
    if cfg.epochs:
        return cfg.epochs
    recipe = recipe_for(cfg)
    if recipe.min_tokens and epoch_tokens and recipe.epochs * epoch_tokens < recipe.min_tokens:
        return max(recipe.epochs, min(MAX_EPOCHS, float(math.ceil(recipe.min_tokens / epoch_tokens))))
    return recipe.epochs
