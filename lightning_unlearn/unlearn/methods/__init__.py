"""The unlearning methods, one small object each (registered by name in :data:`lightning_unlearn.unlearn.METHODS`):
one-step updates (:mod:`.one_step`), iterative baselines (:mod:`.iterative`), SAM-style objectives (:mod:`.sam`), the
toolkits' baselines (:mod:`.baselines`), SSD (:mod:`.ssd`); inverse Hessian-vector products for the second order
(:mod:`.inverse_hvp`)."""
