"""Optimizers for BERT pretraining and fine-tuning: Google's AdamW, LAMB, warmup + linear decay.

`create_optimizer` returns a Keras 3 optimizer that works with `model.fit` and with
`optimizer.apply_gradients` in custom loops, also inside a tf.distribute strategy. One call to
`apply_gradients` is one micro-batch; with `gradient_accumulation_steps=k` the variables change on
every k-th call, by the update one batch k times larger would give.

Order of operations per update (as in google-research/bert, where TPU gradients are already summed
across cores before clipping):
  all-reduce over replicas -> accumulate -> average over micro-batches -> global-norm clip -> update.
"""

import keras
import tensorflow as tf

# Google's exclusion list: no weight decay on LayerNorm parameters and biases. Matched against the
# variable's Keras path (".../LayerNorm/gamma", ".../dense/bias", ".../output_bias").
NO_DECAY_PATTERNS = ("LayerNorm", "layer_norm", "bias")


class WarmupPolynomialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `init_lr` over `num_warmup_steps`, then Google's polynomial decay.

    Like Google's `create_optimizer`, the decay is a function of the global step from 0 (not from
    the end of warmup): lr(t) = init_lr * (1 - t / num_train_steps) ** power for t >= warmup.
    """

    def __init__(self, init_lr, num_train_steps, num_warmup_steps=0, end_lr=0.0, power=1.0):
        if num_train_steps < 1:
            raise ValueError(f"num_train_steps must be >= 1, got {num_train_steps}")
        if not 0 <= num_warmup_steps <= num_train_steps:
            raise ValueError(f"num_warmup_steps must be in [0, num_train_steps={num_train_steps}], "
                             f"got {num_warmup_steps}")
        self.init_lr, self.end_lr, self.power = float(init_lr), float(end_lr), float(power)
        self.num_train_steps, self.num_warmup_steps = int(num_train_steps), int(num_warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        done = tf.minimum(step, float(self.num_train_steps)) / self.num_train_steps
        decayed = (self.init_lr - self.end_lr) * (1.0 - done) ** self.power + self.end_lr
        if self.num_warmup_steps == 0:
            return decayed
        warmup = self.init_lr * step / self.num_warmup_steps
        return tf.where(step < self.num_warmup_steps, warmup, decayed)

    def get_config(self):
        return {"init_lr": self.init_lr, "num_train_steps": self.num_train_steps,
                "num_warmup_steps": self.num_warmup_steps, "end_lr": self.end_lr,
                "power": self.power}


class _BertOptimizer(keras.optimizers.Optimizer):
    """Shared plumbing: decay exclusion, all-reduce before clipping, an LR schedule in update steps."""

    def __init__(self, learning_rate, weight_decay_rate, beta_1, beta_2, epsilon, clip_norm,
                 gradient_accumulation_steps, no_decay_patterns, name, **kwargs):
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        # Weight decay is part of our update_step (inside LAMB's trust ratio), so Keras' own
        # decoupled `weight_decay` stays off.
        super().__init__(
            learning_rate=learning_rate, name=name,
            global_clipnorm=clip_norm if clip_norm else None,
            gradient_accumulation_steps=(gradient_accumulation_steps
                                         if gradient_accumulation_steps > 1 else None),
            **kwargs)
        self.weight_decay_rate = float(weight_decay_rate)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.no_decay_patterns = tuple(no_decay_patterns)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._m, self._v = self.add_optimizer_variables(var_list, ["m", "v"])
        # Decided here on the Keras variables: update_step sees the backing tf.Variables, whose
        # names lack the layer path.
        self._decay_flags = [self.weight_decay_rate > 0 and
                             not any(p in v.path for p in self.no_decay_patterns) for v in var_list]

    def _decays(self, variable):
        return self._decay_flags[self._get_variable_index(variable)]

    def _get_current_learning_rate(self):
        # Keras evaluates schedules at the micro-batch counter; the schedule is in update steps.
        if isinstance(self._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    def _backend_apply_gradients(self, grads, trainable_variables):
        # Embedding lookups give IndexedSlices with repeated rows; the global norm of their values is
        # not the norm of the gradient, so make them dense (Adam's update is dense anyway).
        grads = [tf.convert_to_tensor(g) for g in grads]
        # Sum over replicas first, so accumulation and the global-norm clip see the gradient of the
        # whole batch (Keras would clip each replica's part before reducing).
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            grads = context.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))
        k = self.gradient_accumulation_steps or 1
        if k == 1:
            self._backend_update_step(self._clip_gradients(grads), trainable_variables,
                                      self.learning_rate)
            return
        # Keras' own accumulation wraps a merge_call in tf.cond, which fails inside tf.function under
        # tf.distribute strategies; here the cond sits inside each per-device variable update.
        accumulators = [self._accumulated_gradients[self._get_variable_index(v)]
                        for v in trainable_variables]
        totals = [acc + g for acc, g in zip(accumulators, grads)]        # sums of k micro-batches
        is_update = tf.equal((self._iterations + 1) % k, 0)
        mean_grads = self._clip_gradients([t / k for t in totals])
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_accumulate_or_update, self._distribution_strategy,
            [_tf_variable(v) for v in trainable_variables], mean_grads, totals,
            [_tf_variable(a) for a in accumulators], is_update, self.learning_rate)

    def _distributed_accumulate_or_update(self, distribution, variables, grads, totals,
                                          accumulators, is_update, learning_rate):
        def accumulate_or_update(variable, grad, total, accumulator, is_update, learning_rate):
            def update():
                self.update_step(grad, variable, learning_rate)
                accumulator.assign(tf.zeros_like(accumulator))

            def accumulate():
                accumulator.assign(total)

            tf.cond(is_update, update, accumulate)

        for args in zip(variables, grads, totals, accumulators):
            distribution.extended.update(args[0], accumulate_or_update,
                                         args=args[1:] + (is_update, learning_rate), group=False)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return grads_and_vars  # already reduced in _backend_apply_gradients

    def _moments(self, gradient, variable):
        """Updates and returns Adam's first and second moments (no bias correction)."""
        g = tf.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        m, v = self._m[index], self._v[index]
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * g)
        self.assign(v, self.beta_2 * v + (1.0 - self.beta_2) * tf.square(g))
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
                 epsilon=1e-6, clip_norm=1.0, gradient_accumulation_steps=1,
                 no_decay_patterns=NO_DECAY_PATTERNS, name="adam_weight_decay", **kwargs):
        super().__init__(learning_rate, weight_decay_rate, beta_1, beta_2, epsilon, clip_norm,
                         gradient_accumulation_steps, no_decay_patterns, name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        m, v = self._moments(gradient, variable)
        update = m / (tf.sqrt(v) + self.epsilon)
        if self._decays(variable):
            update += self.weight_decay_rate * variable
        self.assign_sub(variable, tf.cast(learning_rate, variable.dtype) * update)


class Lamb(_BertOptimizer):
    """LAMB (You et al. 2019) for large batches: Adam direction (with bias correction) plus weight
    decay, rescaled per tensor by the trust ratio ||w|| / ||update||.

    Written here rather than taken from keras.optimizers.Lamb because that one applies weight decay
    outside the trust ratio and adapts LayerNorm/bias tensors too; here those are excluded from both,
    as in the paper's BERT setup.
    """

    def __init__(self, learning_rate=1e-3, weight_decay_rate=0.01, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-6, clip_norm=1.0, gradient_accumulation_steps=1,
                 no_decay_patterns=NO_DECAY_PATTERNS, name="lamb", **kwargs):
        super().__init__(learning_rate, weight_decay_rate, beta_1, beta_2, epsilon, clip_norm,
                         gradient_accumulation_steps, no_decay_patterns, name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        m, v = self._moments(gradient, variable)
        t = tf.cast(self.iterations + 1, variable.dtype)  # update steps, not micro-batches
        m_hat = m / (1.0 - tf.pow(tf.cast(self.beta_1, variable.dtype), t))
        v_hat = v / (1.0 - tf.pow(tf.cast(self.beta_2, variable.dtype), t))
        update = m_hat / (tf.sqrt(v_hat) + self.epsilon)
        ratio = 1.0
        if self._decays(variable):
            update += self.weight_decay_rate * variable
            w_norm, u_norm = tf.norm(variable), tf.norm(update)
            ratio = tf.where((w_norm > 0) & (u_norm > 0), w_norm / tf.maximum(u_norm, 1e-30), 1.0)
        self.assign_sub(variable, tf.cast(learning_rate, variable.dtype) * ratio * update)


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def create_optimizer(init_lr, num_train_steps, num_warmup_steps, optimizer_type="adamw",
                     weight_decay=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-6, clip_norm=1.0,
                     gradient_accumulation_steps=1):
    """The optimizer for run_pretraining / run_classifier (Google's defaults).

    num_train_steps and num_warmup_steps count optimizer updates (not micro-batches).
    optimizer_type: "adamw" (Google's AdamWeightDecay) or "lamb". clip_norm=0 turns clipping off.
    """
    schedule = WarmupPolynomialDecay(init_lr, num_train_steps, num_warmup_steps)
    kinds = {"adamw": AdamWeightDecay, "lamb": Lamb}
    if optimizer_type not in kinds:
        raise ValueError(f"--optimizer={optimizer_type!r} is not one of {sorted(kinds)}")
    return kinds[optimizer_type](
        learning_rate=schedule, weight_decay_rate=weight_decay, beta_1=beta_1, beta_2=beta_2,
        epsilon=epsilon, clip_norm=clip_norm,
        gradient_accumulation_steps=gradient_accumulation_steps)
