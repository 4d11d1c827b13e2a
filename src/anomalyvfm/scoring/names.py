"""Names of the scoring stage's choices, kept free of torch so that settings can declare them."""

SCORERS = ("mahalanobis", "knn")
MEMORY_BANKS = ("reservoir", "merge")
SCORE_MODES = ("distance", "head", "fusion")
IMAGE_EVIDENCE = ("patch", "patch+global")
AUTO = "auto"  # a setting the fit chooses (`image_evidence`): a saved model holds the choice, never "auto"
