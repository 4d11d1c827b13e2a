"""Deployment: export a fitted detector to an inference bundle (`export`, needs torch) and run bundles
without torch (`runtime`); `load_predictor` opens either a bundle or a model directory."""
