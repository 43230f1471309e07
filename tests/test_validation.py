"""Every public transform rejects out-of-range hyperparameters when built
(adaprelora_jax._src.validation), and leaves injected and scheduled ones alone."""

import inspect
import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import adaprelora_jax as ap

# name -> builder from keyword arguments, for every public transform.
TRANSFORMS = {
  "adaprelora": lambda **kw: ap.adaprelora(1e-2, **kw),
  "adaprelora_adamw": lambda **kw: ap.adaprelora_adamw(1e-2, **kw),
  "scale_by_adaprelora": ap.scale_by_adaprelora,
  "lora_plus": lambda **kw: ap.lora_plus(1e-2, **kw),
  "scale_by_lora_plus": lambda **kw: ap.scale_by_lora_plus(**{"lr_ratio": 16.0, **kw}),
  "scaled_gd": lambda **kw: ap.scaled_gd(1e-2, **kw),
  "scaled_adamw": lambda **kw: ap.scaled_adamw(1e-2, **kw),
  "scale_by_riemannian_preconditioner": ap.scale_by_riemannian_preconditioner,
  "lora_pro": lambda **kw: ap.lora_pro(1e-2, **kw),
  "scale_by_lora_pro": ap.scale_by_lora_pro,
  "lora_rite": lambda **kw: ap.lora_rite(1e-2, **kw),
  "scale_by_lora_rite": ap.scale_by_lora_rite,
  "track_step_metrics": ap.track_step_metrics,
}

NAN = math.nan
ADAM = [("b1", -0.1), ("b1", 1.0), ("b2", 1.5), ("b2", NAN), ("eps", -1e-8), ("eps_root", -1.0)]
WEIGHT_DECAY = [("weight_decay", -1e-2), ("weight_decay", NAN)]
ADAPRELORA = [
  ("decay_rate", -1.0),
  ("decay_rate", 1.5),
  ("decay_rate", NAN),
  ("eps", -1.0),
  ("b1", 1.5),
  ("b1", 1.0),
  ("b1", -0.1),
  ("damping", -1e-3),
  ("damping_floor", 0.0),
  ("clipping_threshold", -1.0),
  ("clipping_threshold", 0.0),
  ("step_offset", -1),
  ("statistics", "full"),
  ("nonfinite", "raise"),
]
# The AdamW variant's preconditioner: its eps is Adam's, Adafactor's is
# statistics_eps, and it has no momentum of its own (b1 is Adam's).
ADAPRELORA_ADAMW = [(name, value) for name, value in ADAPRELORA if name not in ("eps", "b1")] + [
  ("statistics_eps", -1.0)
]
RIEMANNIAN = [("reg", 0.0), ("reg", -1.0)]
LORA_PRO = [("mode", "fast"), ("lora_scale", 0.0), ("lora_scale", -2.0), ("damping", -1e-8)] + ADAM
LORA_RITE = [
  ("b1", -0.5),
  ("b1", 1.0),
  ("b2", 1.0),
  ("eps", -1e-6),
  ("clip_unmagnified_grad", 0.0),
  ("update_skipping", -1.0),
  ("update_capping", 0.0),
]

# name -> [(parameter, out-of-range value)]
BAD = {
  "adaprelora": ADAPRELORA + WEIGHT_DECAY,
  "adaprelora_adamw": ADAPRELORA_ADAMW + ADAM + WEIGHT_DECAY,
  "scale_by_adaprelora": ADAPRELORA,
  "lora_plus": [("lr_ratio", 0.0)] + ADAM + WEIGHT_DECAY,
  "scale_by_lora_plus": [("lr_ratio", 0.0), ("lr_ratio", -16.0)],
  "scaled_gd": RIEMANNIAN + WEIGHT_DECAY,
  "scaled_adamw": RIEMANNIAN + ADAM + WEIGHT_DECAY,
  "scale_by_riemannian_preconditioner": RIEMANNIAN,
  "lora_pro": LORA_PRO + WEIGHT_DECAY,
  "scale_by_lora_pro": LORA_PRO,
  "lora_rite": LORA_RITE + WEIGHT_DECAY,
  "scale_by_lora_rite": LORA_RITE,
  "track_step_metrics": [],  # no numeric hyperparameters
}

ADAM_EDGES = [dict(b1=0.0, b2=0.0), dict(eps=0.0, eps_root=0.0), dict(b1=0.999999)]
ADAPRELORA_EDGES = [
  dict(decay_rate=0.0),
  dict(decay_rate=1.0),
  dict(eps=0.0),
  dict(b1=0.0),
  dict(b1=None),
  dict(damping=0.0, damping_floor=1e-30),
  dict(clipping_threshold=None),
  dict(clipping_threshold=1e-12),
  dict(step_offset=0),
  dict(step_offset=10),
  dict(metrics=True),
  # A custom schedule gives decay_rate its own meaning: it is not checked.
  dict(decay_rate=-1.0, decay_rate_fn=lambda step, rate: jnp.asarray(0.5)),
]
RITE_EDGES = [
  dict(b1=0.0, b2=0.0, eps=0.0),
  dict(clip_unmagnified_grad=None, update_skipping=None, update_capping=1e-6),
]

# name -> keyword arguments at the edges of their ranges, all accepted.
GOOD = {
  "adaprelora": ADAPRELORA_EDGES + [dict(weight_decay=0.0)],
  "adaprelora_adamw": [
    {name: value for name, value in edges.items() if name not in ("eps", "b1")}
    for edges in ADAPRELORA_EDGES
  ]
  + ADAM_EDGES
  + [dict(statistics_eps=0.0, weight_decay=0.0, statistics="surrogate")],
  "scale_by_adaprelora": ADAPRELORA_EDGES + [dict(statistics="surrogate")],
  "lora_plus": ADAM_EDGES + [dict(lr_ratio=1e-6, weight_decay=0.0)],
  "scale_by_lora_plus": [dict(lr_ratio=1e-6)],
  "scaled_gd": [dict(reg=1e-30, weight_decay=0.0)],
  "scaled_adamw": ADAM_EDGES + [dict(reg=1e-30, weight_decay=0.0)],
  "scale_by_riemannian_preconditioner": [dict(reg=1e-30)],
  "lora_pro": ADAM_EDGES + [dict(mode="full", damping=0.0, weight_decay=0.0)],
  "scale_by_lora_pro": ADAM_EDGES + [dict(mode="full", lora_scale=1e-3, damping=0.0)],
  "lora_rite": RITE_EDGES + [dict(weight_decay=0.0)],
  "scale_by_lora_rite": RITE_EDGES,
  "track_step_metrics": [dict(pairing="nnx")],
}


def _params(dtype=jnp.float32):
  return {
    "q": {"lora_a": jnp.full((8, 2), 0.5, dtype), "lora_b": jnp.full((2, 4), 0.1, dtype)},
    "head": jnp.ones((4,), dtype),
  }


def public_transforms():
  """The package's public functions that return an optax transform."""
  found = set()
  for name in ap.__all__:
    value = getattr(ap, name)
    if inspect.isfunction(value) and "GradientTransformation" in str(
      inspect.signature(value).return_annotation
    ):
      found.add(name)
  return found


def test_every_public_transform_is_covered():
  assert set(TRANSFORMS) == set(BAD) == set(GOOD) == public_transforms()


@pytest.mark.parametrize(
  "name,parameter,value",
  [
    pytest.param(name, parameter, value, id=f"{name}-{parameter}={value}")
    for name, cases in BAD.items()
    for parameter, value in cases
  ],
)
def test_out_of_range_hyperparameters_raise_naming_the_parameter(name, parameter, value):
  with pytest.raises(ValueError, match=rf"^{re.escape(parameter)} must be"):
    TRANSFORMS[name](**{parameter: value})


@pytest.mark.parametrize(
  "name,kwargs",
  [
    pytest.param(name, kwargs, id=f"{name}-{'-'.join(map(str, kwargs.items()))}")
    for name, cases in GOOD.items()
    for kwargs in cases
  ],
)
def test_hyperparameters_at_the_edges_of_their_ranges_are_accepted(name, kwargs):
  tx = TRANSFORMS[name](**kwargs)
  params = _params()
  if name.startswith("scale_by_"):
    del params["head"]  # A core owns the LoRA factors only; the aliases route the head.
  jax.eval_shape(tx.init, params)


def test_injected_and_scheduled_hyperparameters_keep_working():
  params = _params()
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  injected = optax.inject_hyperparams(ap.adaprelora)(
    learning_rate=1e-2, decay_rate=0.8, b1=0.9, weight_decay=1e-3, clipping_threshold=1.0
  )
  state = injected.init(params)
  updates, state = jax.jit(injected.update)(grads, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # Concrete but injected: not checked at construction, even out of range.
  state.hyperparams["b1"] = jnp.asarray(1.5)
  injected.update(grads, state, params)
  scheduled = ap.adaprelora(optax.linear_schedule(1e-2, 0.0, 10))
  updates, _ = scheduled.update(grads, scheduled.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# Per alias: a hyperparameter that rounds out of range in bfloat16.
ROUNDED_TO_ONE = {
  "adaprelora": "b1",
  "adaprelora_adamw": "b2",
  "lora_plus": "b2",
  "scaled_adamw": "b2",
  "lora_pro": "b2",
  "lora_rite": "b2",
  "scaled_gd": None,
}


@pytest.mark.parametrize("name", sorted(ROUNDED_TO_ONE))
def test_injected_hyperparameters_are_not_checked(name):
  # inject_hyperparams casts the hyperparameters to the params' dtype: for
  # bfloat16 params 0.999 arrives as exactly 1.0, which must not be rejected
  # as the host value 1.0 would be. Under jit they are traced.
  params = _params(jnp.bfloat16)
  parameter = ROUNDED_TO_ONE[name]
  extra = {} if parameter is None else {parameter: 0.999}
  tx = optax.inject_hyperparams(getattr(ap, name))(learning_rate=1e-2, **extra)
  state = tx.init(params)
  if parameter is not None:
    assert float(state.hyperparams[parameter]) == 1.0
  jax.eval_shape(tx.update, params, state, params)
