"""Every optimizer of the package, at one small learning rate, for tests that
run the same property over all of them."""

import adaprelora_jax as ap

EVERY_OPTIMIZER = {
  "adaprelora": lambda: ap.adaprelora(1e-2),
  "adaprelora_b1": lambda: ap.adaprelora(1e-2, b1=0.9),
  "adaprelora_adamw": lambda: ap.adaprelora_adamw(1e-2),
  "lora_plus": lambda: ap.lora_plus(1e-2),
  "scaled_gd": lambda: ap.scaled_gd(1e-2),
  "scaled_adamw": lambda: ap.scaled_adamw(1e-2),
  "lora_pro": lambda: ap.lora_pro(1e-2),
  "lora_rite": lambda: ap.lora_rite(1e-2),
}
