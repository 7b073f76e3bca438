"""`umtam eval`'s options."""

from __future__ import annotations

from umtam.config.schema import COUNT_LIMIT, SEED_LIMIT, PathText, Schema, option


class EvalSettings(Schema):
    """What to evaluate and how (the library's evaluate_checkpoint takes these)."""

    task: str = option("glue", help="A task, a comma list, or 'glue' for every task the checkpoint has "
                                       "(lm, sft, choice: every task of that kind).")
    data_dir: PathText | None = option(None, metavar="DIRECTORY", help="GLUE directory (TSV or parquet layout).")
    data: PathText | None = option(None, metavar="TEXT",
                                   help="lm, sft, choice: the text to evaluate on (.txt, .jsonl, parquet, a directory or a "
                                        "hub id).", default_text="each task's recorded validation text")
    max_eval_samples: int | None = option(None, ge=1, le=COUNT_LIMIT, help="Subsample each dev set (seeded).")
    max_length: int | None = option(None, ge=1, le=COUNT_LIMIT, help="Truncate inputs to this many tokens.",
                                    default_text="128, or the model's positions if fewer")
    batch_size: int = option(64, ge=1, le=COUNT_LIMIT, help="Evaluation batch size.")
    seed: int = option(42, ge=0, lt=SEED_LIMIT, help="Seed for dev subsampling.")
    holdout_fraction: float = option(0.0, ge=0, lt=1,
                                     help="Evaluate the fixed holdout slice of train (as kept by train "
                                          "--holdout-fraction) instead of dev.")


class EvalConfig(EvalSettings):
    checkpoint: PathText = option(argument=True, recorded=False, help="The checkpoint to evaluate.")
