"""Dynamic whole-word masking on the device, for the JAX path (`KERAS_BACKEND=jax`).

The rule is pretraining_records.mask_whole_words, written once in keras.ops: tf.data runs it on the
TensorFlow backend, and `mask_batch` runs the very same function inside the jitted JAX step. Only
the random numbers differ: here they are JAX's, drawn from (seed, stream position) with
jax.random.fold_in, there TensorFlow's stateless draws from the same pair. So the masks of a given
position are other masks than tf.data's, with the same rules and statistics (tests/test_jax_masking.py
pins both: equal outputs for equal draws, equal statistics for each backend's own draws).

    opts = jax_masking.options(info, masked_lm_prob, max_pred)        # from the records' sidecar
    batch = next(record_reader.train_batches(...))                      # token_ids, num_tokens, ...
    tensors = jax_masking.mask_batch(batch, seed, **opts)               # inside jax.jit: fine
"""

import numpy as np

import pretraining_records as records


def options(info, masked_lm_prob, max_pred):
    """The keyword arguments of mask_batch for records described by `info` (their sidecar's special
    ids and replacement ids, checked by pretraining_records.masking_settings)."""
    settings = records.masking_settings(info, masked_lm_prob)
    return {"max_pred": int(max_pred), "masked_lm_prob": float(masked_lm_prob),
            "pool": np.asarray(settings["pool"], np.int32), "cls_id": int(settings["cls_id"]),
            "sep_id": int(settings["sep_id"]), "mask_id": int(settings["mask_id"])}


def draw(seed, positions, seq_len):
    """float32 [B, 3 * seq_len + 1] uniforms in [0, 1), row b a function of (seed, positions[b])."""
    import jax
    key = jax.random.key(seed)

    def one(position):
        return jax.random.uniform(jax.random.fold_in(key, position), (3 * seq_len + 1,))

    return jax.vmap(one)(positions)


def mask_batch(batch, seed, *, max_pred, masked_lm_prob, pool, cls_id, sep_id, mask_id):
    """Unmasked batch (record_reader: token_ids [B, S], num_tokens [B], word_starts [B, S],
    positions [B]) -> the model's tensors, masks drawn from (seed, position). Jittable (seed may be a
    traced int). Evaluation passes pretraining_records.EVAL_MASK_SEED as the seed, as tf.data does.
    Rows with num_tokens 0 (evaluation padding) come out all zero: they do not count."""
    import keras
    if keras.backend.backend() != "jax":
        raise RuntimeError("jax_masking.mask_batch runs on the JAX backend (KERAS_BACKEND=jax); "
                           "the TensorFlow path masks in tf.data (pretraining_records)")
    import jax.numpy as jnp
    ids = jnp.asarray(batch["token_ids"], jnp.int32)
    num_tokens = jnp.asarray(batch["num_tokens"], jnp.int32)
    uniform = draw(seed, jnp.asarray(batch["positions"], jnp.int32), ids.shape[1])
    out = records.mask_whole_words(
        ids, jnp.maximum(num_tokens, 1), jnp.asarray(batch["word_starts"], bool), uniform,
        max_pred=max_pred, masked_lm_prob=masked_lm_prob, pool=jnp.asarray(pool), cls_id=cls_id,
        sep_id=sep_id, mask_id=mask_id)
    valid = num_tokens > 0
    return {k: jnp.where(valid[:, None], v, jnp.zeros_like(v)) for k, v in out.items()}
