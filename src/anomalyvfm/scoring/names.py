"""Names of the scoring stage's choices, kept free of torch so that settings can declare them."""

SCORERS = ("mahalanobis", "knn")
MEMORY_BANKS = ("reservoir", "merge")
SCORE_MODES = ("distance", "head", "fusion")
IMAGE_EVIDENCE = ("patch", "patch+global")
