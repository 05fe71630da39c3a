"""The PEFT round trips the parity tests share: a file written by one tool and read by the other
gives the same logits, both tools write the same file layout, and one backward step gives the
same gradients. Each returns or asserts; the test files keep their cases, tolerances and
``parity_results`` keys."""

import contextlib
import copy
import json
import warnings

import torch
from safetensors.torch import load_file

import deltatune as dt
from tiny_models import eval_logits, sample_ids


def _quiet(quiet: bool):
    """Silences warnings (the tools' notes on a config) when ``quiet``."""
    if not quiet:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _changed_by(model, base, ids, min_change: float) -> torch.Tensor:
    """``model``'s logits, after asserting the adapter really changes the output."""
    logits = eval_logits(model, ids)
    assert (logits - eval_logits(base, ids)).abs().max() > min_change  # the adapter really changes the output
    return logits


def load_peft_file(base, peft_model, folder, trainable: bool = False, quiet: bool = False):
    """Saves ``peft_model`` to ``folder`` and loads that file into a copy of ``base`` with deltatune."""
    peft_model.save_pretrained(folder)
    with _quiet(quiet):
        return dt.load_adapter(copy.deepcopy(base), folder, trainable=trainable)


def peft_file_to_deltatune(base, peft_model, folder, min_change: float = 1e-2, quiet: bool = False) -> float:
    """PEFT saves its (randomised) adapter, deltatune loads the file: the worst |logit difference|,
    after asserting the adapter changes the base's output by more than ``min_change``."""
    ours = load_peft_file(base, peft_model, folder, quiet=quiet)
    ids = sample_ids()
    expected = _changed_by(peft_model, base, ids, min_change)
    return (eval_logits(ours, ids) - expected).abs().max().item()


def deltatune_file_to_peft(base, model, folder, min_change: float = 1e-2, quiet: bool = False) -> float:
    """deltatune saves its (randomised) adapter, PEFT loads the file: the worst |logit difference|,
    after asserting the adapter changes the base's output by more than ``min_change``."""
    import peft

    dt.save_adapter(model, folder)
    with _quiet(quiet):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    ids = sample_ids()
    expected = _changed_by(model, base, ids, min_change)
    return (eval_logits(theirs, ids) - expected).abs().max().item()


def assert_same_files(peft_model, model, folder, fields, unordered_lists: bool = True):
    """Both tools save their adapter (under ``folder``/theirs and /ours): the tensor files have the
    same keys, shapes and dtypes, the adapter_config.json files the same field set and peft_type,
    and each of ``fields`` the same value (two lists in any order, with ``unordered_lists``).
    Returns the (ours, theirs) tensors."""
    peft_model.save_pretrained(folder / "theirs")
    dt.save_adapter(model, folder / "ours")
    theirs = load_file(folder / "theirs" / "adapter_model.safetensors")
    ours = load_file(folder / "ours" / "adapter_model.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in theirs.items()}
    their_cfg = json.loads((folder / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((folder / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    assert our_cfg["peft_type"] == their_cfg["peft_type"]
    for key in fields:
        mine, other = our_cfg[key], their_cfg[key]
        if unordered_lists and isinstance(other, list) and isinstance(mine, list):
            mine, other = sorted(mine), sorted(other)
        assert mine == other, key
    return ours, theirs


def peft_name(name: str) -> str:
    """A PEFT parameter's name as deltatune names it: no PeftModel prefix, no adapter name."""
    return name.removeprefix("base_model.model.").replace(".default", "")


def _our_name(name: str) -> str:
    return name.replace(".default", "")


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(peft_model, model, ids, atol: float, rtol: float, *, their_name=peft_name,
                          our_name=_our_name, our_tensors=_trainable, nonzero: bool = False) -> None:
    """One backward step (train mode, the language-model loss of ``ids``) on each model: the same
    trainable tensors, named by ``their_name`` / ``our_name`` (``our_tensors`` lists deltatune's),
    get the same gradients; with ``nonzero`` each gradient must also be nonzero."""
    for m in (peft_model, model):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    their_grads = {their_name(n): p.grad for n, p in _trainable(peft_model).items()}
    our_grads = {our_name(n): p.grad for n, p in our_tensors(model).items()}
    assert our_grads and set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        if nonzero:
            assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, their_grads[name], atol=atol, rtol=rtol, msg=name)


def merged_vs_peft_merged(base, peft_model, folder) -> float:
    """deltatune loads PEFT's file and merges it: the worst |logit difference| from PEFT's
    merge_and_unload, after asserting that unmerging restores the logits and weights bit for bit."""
    ours = load_peft_file(base, peft_model, folder)
    ids = sample_ids()
    unmerged = eval_logits(ours, ids)
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    dt.merge(ours, verbose=False)
    diff = (eval_logits(ours, ids) - eval_logits(peft_model.merge_and_unload(), ids)).abs().max().item()
    dt.unmerge(ours)
    assert torch.equal(eval_logits(ours, ids), unmerged)
    assert all(torch.equal(v, weights[k]) for k, v in ours.state_dict().items())  # bit for bit
    return diff
