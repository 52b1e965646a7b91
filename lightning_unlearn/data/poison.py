"""Poisoning and forgetting scenarios: specifications, and the record of exactly which samples are to be forgotten.

A :class:`PoisonSpec` (:mod:`~lightning_unlearn.data.spec`) says *how* to poison, or which clean samples to forget (by
count or fraction; seeded). Applying it to a label vector (:func:`make_poison`) gives a :class:`PoisonRecord`
(:mod:`~lightning_unlearn.data.record`): the sorted indices, their true labels and the labels trained with, plus the
spec, the seed and the dataset it was made for. The record is what unlearning needs (forget set = the recorded samples
with the labels trained with, and for backdoors their triggered inputs; corrected forget set = the same inputs with
true labels, for poisons only; retain set = everything else), so it is saved as ``poison.json`` next to the
checkpoint and validated against the dataset it is applied to.

=============== =================================================================== ===================================
kind            what is poisoned                                                    attacked metric (the *harm*)
=============== =================================================================== ===================================
``label_flip``  samples of ``source_class`` all get the label ``target_class``      accuracy on ``source_class``
                (the standard targeted label-flipping attack, source → target)
``backdoor``    samples of the other classes (or of ``source_class``) get a         attack success rate: triggered
                trigger patch stamped on the image and the label ``target_class``   test images of the other classes
                (BadNets)                                                           classified as ``target_class``
``targeted``    samples of ``target_class`` get a random other label (or            accuracy on ``target_class``
                ``poison_label``): Warnecke et al.'s setting
``untargeted``  random samples get a random other label (with a recipe that fits    test accuracy; forget-set fit
                them: memorised noise)
``pairflip``    random samples get the label ``C − 1 − y``                          test accuracy
=============== =================================================================== ===================================

The forgetting scenarios of the unlearning toolkits (SalUn, Unlearn-Sparse): the model is trained on *clean* data,
forget set included, and the request is to remove the forget set. No label is wrong, so there are no corrected labels:
the data module says so (``has_corrected_labels`` false) and methods that need them (``FirstOrder``, ``SecondOrder``,
``SamForget``) are refused; the forget set's "poisoned" labels are its clean labels. The reference is, as for every
kind, the model retrained without the forget set (``configs/retrain.yaml``: ``drop_poisoned: true``).

================= ================================================ ================================================
kind              the forget set                                   harm (the attacked metric) and fit
================= ================================================ ================================================
``classwise``     every training sample of ``target_class`` (or a  harm: the forgotten class's test accuracy,
                  seeded ``count`` / ``fraction`` of them)         trained minus retrained (high vs ≈ 0); fit:
                                                                   forget-set accuracy (retrained ≈ 0)
``random_sample`` a seeded ``count`` / ``fraction`` of the whole   harm: forget-set accuracy, trained minus
                  training set, any class                          retrained (the generalisation gap: small on
                                                                   MNIST, often below the 3-point noise level,
                                                                   which the report then says; membership
                                                                   inference is the evidence there); fit: the same
                                                                   forget-set accuracy
================= ================================================ ================================================

Naming: in ``label_flip`` and ``backdoor`` ``target_class`` is the label the attack makes the model output (the usual
naming of these attacks); in ``targeted`` it is, as in Warnecke et al., the class whose samples are relabelled, and in
``classwise`` the class forgotten (the usual naming of class-wise unlearning). The class whose test accuracy is the
attacked metric is :meth:`PoisonSpec.attacked_class` in every case.
"""

from __future__ import annotations

import torch

from lightning_unlearn.data.record import RECORD_VERSION, PoisonRecord
from lightning_unlearn.data.spec import POISON_KINDS, REMOVAL_KINDS, TRIGGER_POSITIONS, PoisonSpec, Trigger, draw

__all__ = [
    "POISON_KINDS",
    "RECORD_VERSION",
    "REMOVAL_KINDS",
    "TRIGGER_POSITIONS",
    "PoisonRecord",
    "PoisonSpec",
    "Trigger",
    "make_poison",
]


def make_poison(labels: torch.Tensor, num_classes: int, spec: PoisonSpec, dataset: str) -> PoisonRecord:
    """Choose the samples to poison (or forget) and the labels they are trained with, reproducibly from
    ``spec.seed`` (:func:`~lightning_unlearn.data.spec.draw`), as a record.

    Args:
        labels: Clean labels of the training split (1-D integer tensor).
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        spec: What to do.
        dataset: Dataset name stored in the record.

    Raises:
        ValueError: If the spec is impossible for these labels (naming the offending argument).
    """
    labels = torch.as_tensor(labels).long().cpu()
    if spec.kind == "none":
        return PoisonRecord([], [], [], spec.to_dict(), dataset, len(labels), num_classes)
    chosen, given = draw(labels, num_classes, spec)
    true = labels[chosen]
    return PoisonRecord(
        chosen.tolist(), true.tolist(), given.tolist(), spec.to_dict(), dataset, len(labels), num_classes
    )
