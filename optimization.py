"""Optimizers for BERT pretraining and fine-tuning: Google's AdamW, LAMB, warmup + linear decay.

This file holds only the learning-rate schedule and the update rules, written on the public Keras
optimizer API (`build` creates the slots, `update_step(gradient, variable, learning_rate)` applies
one rule), so the optimizers work with `model.fit` and with any custom loop. The rules are written
in `keras.ops`, so the same classes run on every Keras backend: the TensorFlow trainer calls
`update_step` per variable, the JAX trainer (pretraining_jax.py) calls `stateless_apply` inside its
jitted step.

Gradients are not this file's business: the pretraining trainer (run_pretraining.MaskedLMTrainer)
owns micro-batch accumulation, the one all-reduce over replicas, the division by the number of
masked positions and the global-norm clip, in Google's order, and then calls `update_step` per
variable. `model.fit` users (fine-tuning) get Keras' own `global_clipnorm` from `clip_norm`.
"""

import math

import keras
from keras import ops

# Google's exclusion list: no weight decay on LayerNorm parameters and biases. Matched against the
# variable's Keras path (".../LayerNorm/gamma", ".../dense/bias", ".../output_bias").
NO_DECAY_PATTERNS = ("LayerNorm", "layer_norm", "bias")


class WarmupPolynomialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `init_lr` over `num_warmup_steps`, then Google's polynomial decay.

    Like Google's `create_optimizer`, the decay is a function of the global step from 0 (not from
    the end of warmup): lr(t) = init_lr * (1 - t / num_train_steps) ** power for t >= warmup.
    """

    def __init__(self, init_lr, num_train_steps, num_warmup_steps=0, end_lr=0.0, power=1.0):
        if not (isinstance(init_lr, (int, float)) and math.isfinite(init_lr) and init_lr > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got {init_lr}")
        if num_train_steps < 1:
            raise ValueError(f"num_train_steps must be >= 1, got {num_train_steps}")
        if not 0 <= num_warmup_steps <= num_train_steps:
            raise ValueError(f"num_warmup_steps must be in [0, num_train_steps={num_train_steps}], "
                             f"got {num_warmup_steps}")
        self.init_lr, self.end_lr, self.power = float(init_lr), float(end_lr), float(power)
        self.num_train_steps, self.num_warmup_steps = int(num_train_steps), int(num_warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        done = ops.minimum(step, float(self.num_train_steps)) / self.num_train_steps
        decayed = (self.init_lr - self.end_lr) * (1.0 - done) ** self.power + self.end_lr
        if self.num_warmup_steps == 0:
            return decayed
        warmup = self.init_lr * step / self.num_warmup_steps
        return ops.where(step < self.num_warmup_steps, warmup, decayed)

    def get_config(self):
        return {"init_lr": self.init_lr, "num_train_steps": self.num_train_steps,
                "num_warmup_steps": self.num_warmup_steps, "end_lr": self.end_lr,
                "power": self.power}


class _BertOptimizer(keras.optimizers.Optimizer):
    """Shared parts of the two rules: Adam moments, and which variables are decayed."""

    def __init__(self, learning_rate, weight_decay_rate, beta_1, beta_2, epsilon, clip_norm,
                 no_decay_patterns, name, **kwargs):
        # Weight decay is part of our update_step (inside LAMB's trust ratio), so Keras' own
        # decoupled `weight_decay` stays off.
        super().__init__(learning_rate=learning_rate, name=name,
                         global_clipnorm=clip_norm if clip_norm else None, **kwargs)
        self.weight_decay_rate = float(weight_decay_rate)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.no_decay_patterns = tuple(no_decay_patterns)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._m, self._v = self.add_optimizer_variables(var_list, ["m", "v"])
        # Decided here on the Keras variables: on TensorFlow update_step sees the backing
        # tf.Variables, whose names lack the layer path.
        self._decay_flags = [self.weight_decay_rate > 0 and
                             not any(p in v.path for p in self.no_decay_patterns) for v in var_list]

    def _decays(self, variable):
        # _get_variable_index: the slot lookup every Keras optimizer's update_step uses.
        return self._decay_flags[self._get_variable_index(variable)]

    def _moments(self, gradient, variable):
        """Updates and returns Adam's first and second moments (no bias correction)."""
        g = ops.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        m, v = self._m[index], self._v[index]
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * g)
        self.assign(v, self.beta_2 * v + (1.0 - self.beta_2) * ops.square(g))
        return m, v

    def get_config(self):
        config = super().get_config()
        config.update(weight_decay_rate=self.weight_decay_rate, beta_1=self.beta_1,
                      beta_2=self.beta_2, epsilon=self.epsilon,
                      no_decay_patterns=list(self.no_decay_patterns))
        return config


class AdamWeightDecay(_BertOptimizer):
    """Google BERT's AdamWeightDecayOptimizer: Adam without bias correction, decoupled weight decay.

      m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2
      w <- w - lr * (m / (sqrt(v) + eps) + wd * w)        (wd = 0 for LayerNorm and biases)
    """

    def __init__(self, learning_rate=1e-4, weight_decay_rate=0.01, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-6, clip_norm=1.0, no_decay_patterns=NO_DECAY_PATTERNS,
                 name="adam_weight_decay", **kwargs):
        super().__init__(learning_rate, weight_decay_rate, beta_1, beta_2, epsilon, clip_norm,
                         no_decay_patterns, name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        m, v = self._moments(gradient, variable)
        update = m / (ops.sqrt(v) + self.epsilon)
        if self._decays(variable):
            update += self.weight_decay_rate * variable
        self.assign_sub(variable, ops.cast(learning_rate, variable.dtype) * update)


class Lamb(_BertOptimizer):
    """LAMB (You et al. 2019) for large batches: Adam direction (with bias correction) plus weight
    decay, rescaled per tensor by the trust ratio ||w|| / ||update||.

    Written here rather than taken from keras.optimizers.Lamb because that one applies weight decay
    outside the trust ratio and adapts LayerNorm/bias tensors too; here those are excluded from both,
    as in the paper's BERT setup.
    """

    def __init__(self, learning_rate=1e-3, weight_decay_rate=0.01, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-6, clip_norm=1.0, no_decay_patterns=NO_DECAY_PATTERNS, name="lamb",
                 **kwargs):
        super().__init__(learning_rate, weight_decay_rate, beta_1, beta_2, epsilon, clip_norm,
                         no_decay_patterns, name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        m, v = self._moments(gradient, variable)
        t = ops.cast(self.iterations + 1, variable.dtype)  # update steps, not micro-batches
        m_hat = m / (1.0 - ops.power(ops.cast(self.beta_1, variable.dtype), t))
        v_hat = v / (1.0 - ops.power(ops.cast(self.beta_2, variable.dtype), t))
        update = m_hat / (ops.sqrt(v_hat) + self.epsilon)
        ratio = 1.0
        if self._decays(variable):
            update += self.weight_decay_rate * variable
            w_norm, u_norm = ops.norm(variable), ops.norm(update)
            ratio = ops.where(ops.logical_and(w_norm > 0, u_norm > 0),
                              w_norm / ops.maximum(u_norm, 1e-30), 1.0)
        self.assign_sub(variable, ops.cast(learning_rate, variable.dtype) * ratio * update)


def create_optimizer(init_lr, num_train_steps, num_warmup_steps, optimizer_type="adamw",
                     weight_decay=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-6, clip_norm=1.0):
    """The optimizer for run_pretraining / run_classifier (Google's defaults).

    num_train_steps and num_warmup_steps count optimizer updates (not micro-batches).
    optimizer_type: "adamw" (Google's AdamWeightDecay) or "lamb". clip_norm: Keras' global-norm clip
    for `model.fit` (0 turns it off; the pretraining trainer clips itself and passes 0).
    """
    schedule = WarmupPolynomialDecay(init_lr, num_train_steps, num_warmup_steps)
    kinds = {"adamw": AdamWeightDecay, "lamb": Lamb}
    if optimizer_type not in kinds:
        raise ValueError(f"--optimizer={optimizer_type!r} is not one of {sorted(kinds)}")
    return kinds[optimizer_type](
        learning_rate=schedule, weight_decay_rate=weight_decay, beta_1=beta_1, beta_2=beta_2,
        epsilon=epsilon, clip_norm=clip_norm)
