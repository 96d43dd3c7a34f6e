"""Our models vs transformers reference outputs (committed goldens; no torch needed)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from models._helpers import F32_ATOL, F32_RTOL, golden, inputs, load_golden_model


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_decoder_logits_every_position(name):
    z = golden(name)
    model = load_golden_model(name)
    ids, mask = inputs(name)
    logits = np.asarray(model(ids, mask))
    assert logits.shape == z["logits"].shape and logits.dtype == np.float32
    # Right padding + causal mask: every position (padded ones included) matches.
    np.testing.assert_allclose(logits, z["logits"], atol=F32_ATOL, rtol=F32_RTOL)
    assert mask.min() == 0, "goldens must include padded rows"


def test_bert_logits_and_hidden():
    z = golden("bert")
    model = load_golden_model("bert")
    assert model.config.pooling == "pooler" and model.config.num_labels == 3
    ids, mask = inputs("bert")
    hidden = np.asarray(model.encode(ids, mask))
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(hidden[valid], z["hidden"][valid], atol=F32_ATOL, rtol=F32_RTOL)
    np.testing.assert_allclose(np.asarray(model(ids, mask)), z["logits"], atol=F32_ATOL,
                               rtol=F32_RTOL)


def test_roberta_hidden_and_pooler():
    z = golden("roberta")
    model = load_golden_model("roberta")
    ids, mask = inputs("roberta")
    hidden = model.encode(ids, mask)
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], z["hidden"][valid], atol=F32_ATOL,
                               rtol=F32_RTOL)
    np.testing.assert_allclose(np.asarray(model.pool(hidden, mask)), z["pooled"], atol=F32_ATOL,
                               rtol=F32_RTOL)


def test_roberta_position_ids_offset_by_padding_idx():
    model = load_golden_model("roberta")
    ids = jnp.array([[0, 5, 6, 1, 1]])
    np.testing.assert_array_equal(np.asarray(model.position_ids(ids)), [[2, 3, 4, 1, 1]])


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_bfloat16_compute_close_to_float32(name):
    ids, mask = inputs(name)
    ref = np.asarray(load_golden_model(name)(ids, mask))
    m16 = load_golden_model(name, dtype="bfloat16", param_dtype="bfloat16")
    leaf = m16.layers[0].ffn_in.kernel if name == "bert" else m16.layers[0].q_proj.kernel
    assert leaf[...].dtype == jnp.bfloat16
    out = np.asarray(m16(ids, mask))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=0.1, rtol=0.1)   # bf16: ~3 significant digits
