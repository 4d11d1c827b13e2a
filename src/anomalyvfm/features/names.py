"""Names of the feature stage's choices, kept free of torch so that settings (and a torch-free runtime) can
declare them without loading the model code."""

DEFAULT_BACKBONE = "facebook/dinov2-base"
PRECISIONS = ("fp32", "fp16", "bf16")  # autocast dtypes of the backbone on a GPU
FOREGROUND_MODES = ("off", "on", "auto")
PATCH = 14  # every DINOv2 has 14-px patches: tile sizes are checked against it before loading the model
