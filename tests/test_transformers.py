"""Tiny Hugging Face models built from configs (GPT-2, BERT, DistilBERT, T5; nothing is
downloaded), called with attention masks as they always are: ``torch.func.vmap`` cannot
run their masking utilities' data-dependent control flow, so ``auto`` falls back (with one
warning) and every engine that can run them gives the exact kernel.

A fast smoke test per model; every method and mode in the slow lane. (This file runs
after the others that count tensors: importing ``transformers`` triples the objects the
garbage collector walks.)
"""

from __future__ import annotations

import pytest

from ntk_torch.kernel import METHODS
from ntk_torch.kernel.planning import FALLBACK_WARNING

from test_any_module import F64, RTOL, assert_exact_or_refused, kernel_of, references_of, relative_error
from zoo import HF_NAMES, make_hf_zoo


@pytest.fixture(scope="module")
def hf_zoo():
    pytest.importorskip("transformers")
    return make_hf_zoo()


@pytest.fixture(scope="module")
def hf_references(hf_zoo):
    return references_of(hf_zoo, 2, 1)  # a forward pass of these costs tens of milliseconds


@pytest.mark.parametrize("name", HF_NAMES)
def test_hugging_face_model_with_attention_mask_is_exact(hf_zoo, hf_references, name):
    """The smoke test of the fast lane: ``auto`` (one warning naming the mask's control
    flow), the full kernel of x1 != x2 (the slow lane runs every method and mode)."""
    case = hf_zoo[name]
    x1, x2, _, cross = hf_references[name]
    kernel = kernel_of(case, "auto", "full", dtype=F64)
    with pytest.warns(RuntimeWarning, match=FALLBACK_WARNING) as record:
        got_cross = kernel(x1, x2)
    fallbacks = [str(w.message) for w in record if FALLBACK_WARNING in str(w.message)]
    assert len(fallbacks) == 1 and "Tensor.__bool__" in fallbacks[0] and "transformers/masking_utils.py" in fallbacks[0]
    assert relative_error(got_cross, cross) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", HF_NAMES)
def test_hugging_face_every_method_and_mode(hf_zoo, hf_references, name, method):
    assert_exact_or_refused(hf_zoo[name], hf_references[name], method)
