"""Where a request's curvature profile comes from (a mixin of ``UnlearnModule``): handed over, loaded from its path
or the run directory, computed on the training set (and saved into the run), or — when neither the selection nor the
method reads curvature values — a layout-only profile, so that no curvature is computed that nothing would use
(:meth:`~lightning_unlearn.curvature.SharpnessProfile.layout_of`). A profile read from a file or handed over is checked
against the model (names, shapes, fingerprints) and against one batch of its data
(:func:`~lightning_unlearn.curvature.plausibility.check_plausible`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_unlearn.curvature import SharpnessProfile, plausibility, weights_fingerprint

__all__ = ["RequestProfile"]


class RequestProfile:
    """The profile of a request (see the module docstring); mixed into ``UnlearnModule``, which provides the model,
    its data, the selection, the method and the profile arguments."""

    # provided by UnlearnModule
    profile: SharpnessProfile | None
    profile_path: str | None
    training_run: Any
    estimator: str
    profile_max_samples: int | None
    allow_stale_profile: bool
    selection: Any
    method: Any
    datamodule: Any
    timings: dict[str, Any]
    _given_profile: SharpnessProfile | None

    def require_profile(self, device: torch.device | str | None = None) -> SharpnessProfile:
        """The curvature profile: loaded from ``profile`` / the run directory, or computed now and saved there.

        Under DDP (called from ``setup``) each rank profiles its shard, one all-reduce of sums and counts gives the
        single-process result, and global rank zero saves it.
        """
        if self.profile is not None:
            return self.profile
        run = self.training_run
        path = self.profile_path or (run.profile_path if run is not None and run.stores_profile else None)
        start = time.perf_counter()
        if self._given_profile is not None:
            profile, source = self._given_profile, "given"
        elif self._profile_exists:
            profile = SharpnessProfile.load(path)
            source = f"loaded from {path}"
        elif not self.needs_curvature and self.profile_path is None:
            profile = SharpnessProfile.layout_of(self.names_root)
            source = "layout only (the selection and method read no curvature; none computed)"
        else:
            profile = self._compute_profile(device)
            source = f"computed ({self.estimator})"
            if path is not None:  # a run's own profile is saved into the run directory
                if self._trainer is None or self.trainer.is_global_zero:
                    profile.save(path)
                if self._distributed:
                    self.trainer.strategy.barrier("unlearn_profile")
                source += f" and saved to {path}"
        named = f"at {str(path)!r}" if path else f"({source})"
        model = f"the checkpoint {str(run.checkpoint)!r}" if run else f"the model ({type(self.names_root).__name__})"
        try:
            profile.check_compatible(self.names_root)
        except ValueError as err:
            raise ValueError(f"{err} (profile {named}, {model}; parameter names must be the model's own)") from err
        weights = weights_fingerprint(self.names_root)
        if profile.weights != weights and not self.allow_stale_profile:
            raise ValueError(
                f"The profile {named} was computed for other weights than {model} (weights fingerprints "
                f"{profile.weights} vs {weights}). Recompute it, or pass `allow_stale_profile=True`."
            )
        if source in ("given",) or source.startswith("loaded"):  # from a file or handed over: plausible values?
            probe = DataLoader(self.datamodule.train_dataset(), batch_size=plausibility.SAMPLES)
            target = torch.device(device) if device is not None else self.device
            plausibility.check_plausible(
                profile, self.names_root, probe, self.source.output_transform, f"The profile {named}", target
            )
        self.timings["profile_seconds"] = time.perf_counter() - start
        self.timings["profile_source"] = source
        self.profile = profile
        return profile

    @property
    def needs_curvature(self) -> bool:
        """Whether the selection or the method reads curvature values (else a missing profile is not computed: a
        layout-only one serves, :meth:`~lightning_unlearn.curvature.SharpnessProfile.layout_of`)."""
        return bool(self.selection.needs_curvature or self.method.needs_curvature)

    @property
    def _profile_exists(self) -> bool:
        """Whether a profile is given or saved in the run directory (else :meth:`require_profile` computes one)."""
        if self._given_profile is not None or self.profile_path is not None:
            return True
        run = self.training_run
        return run is not None and run.stores_profile and run.profile_path.is_file()

    def _compute_profile(self, device: torch.device | str | None) -> SharpnessProfile:
        """The training set's curvature profile (this rank's shard, all-reduced under DDP)."""
        if device is None and self._trainer is not None:
            device = self.trainer.strategy.root_device
        with self.computing_on(device):
            return self._profile_of(self.split_dataset("train"), self.estimator, self.profile_max_samples, "train")
