"""The names the core's methods answer to, defined once (no torch here, so that the config can validate against
them without importing it): the modules that implement each method re-export its names, and the program's config
uses them as the allowed values of its keys."""

from __future__ import annotations

ATTACKS = ("badnet", "blended", "sig", "wanet", "label_consistent")   # core.triggers
TRANSFORMS = ("token_mask", "blur", "downup")                          # core.scoring: trigger-removing transforms
MODEL_METHODS = ("token_drop", "cosine", "loss")                        # core.scoring: scores of one model pass
SCORE_METHODS = MODEL_METHODS + ("caption_disagreement",)               # ... and core.neighbours' score
SALIENCIES = ("auto", "attention", "token", "gradient", "gradient_x_input")  # core.scoring: token saliency
COMBINES = ("max_z", "pick")                                            # core.scoring: several signals -> one score
DENSITY_SCORES = ("kdist", "slof", "dao")                               # core.density
FORGET_LOSSES = ("token_invariance", "push_away", "local_push", "invariance_push", "auto")  # core.unlearning
TRAINABLE = ("all", "visual", "visual.early", "text")                  # core.unlearning: parameters that move
