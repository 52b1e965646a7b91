"""Test support: small user-side classes the tests name by class path (``support.own_model.TinyClassifier``)."""
