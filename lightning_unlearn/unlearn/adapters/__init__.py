"""What is unlearned and how to call it without Trainer code: a training run of the library or any user's model and
data (:mod:`.source`), and :func:`~.functional.unlearn_model` (:mod:`.functional`)."""
