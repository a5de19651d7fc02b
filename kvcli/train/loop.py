"""kvcli train's loop: a bundle's predictor trained step by step (kvcli.train.train's
PredictorTrainer), measured on held-out sequences, checkpointed atomically every few steps
and on Ctrl-C, resumable, and written as a new bundle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcli.errors import KvcliError
from kvcli.train.train import PredictorTrainer, TrainSettings, order_of_sequences, trainable_reason


@dataclass(frozen=True)
class TrainSummary:
    """What a run of kvcli train did (``--json`` prints ``to_json()``): cross-entropy over the
    tail of its first and last 10 steps, the base's own over its true cache, the K/V L1
    term, speed, held-out validation, and every step's figures."""

    output: str
    checkpoint: str
    step: int
    steps_this_run: int
    tokens_per_sequence: int
    tail: int
    sequences_available: int
    source: str
    l1_weight: float
    lr: float
    seed: int
    device: str
    train_aux: bool
    aux_ce_last_10: float | None
    ce_first_10: float | None
    ce_last_10: float | None
    ce_base_last_10: float | None
    kv_l1_first_10: float | None
    kv_l1_last_10: float | None
    tokens_per_s: float | None
    validation: list[dict] | None
    history: list[dict]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def save_checkpoint(state: dict, path: Path) -> Path:
    from kvcli.atomic import write_atomically
    from kvcli.train.torch_forward import _torch

    return write_atomically(path, lambda tmp: _torch().save(state, str(tmp)))


def load_checkpoint(path: Path) -> dict:
    from kvcli.train.torch_forward import _torch

    try:
        return _torch().load(str(path), weights_only=False)
    except Exception as exc:  # a damaged or foreign file
        raise KvcliError(f"cannot read the checkpoint {path} ({type(exc).__name__})") from None


def validation_losses(trainer: PredictorTrainer, sequences: list[list[int]]) -> dict | None:
    """Mean cross-entropy over the tail of held-out sequences: over the predicted cache, and
    the base's over its own."""
    if not sequences:
        return None
    with trainer.torch.no_grad():
        out = [trainer.losses(s) for s in sequences]
    return {
        "step": trainer.step,
        "ce": round(float(np.mean([o["ce"].item() for o in out])), 4),
        "ce_base": round(float(np.mean([o["ce_base"].item() for o in out])), 4),
        "kv_l1": round(float(np.mean([o["kv_l1"].item() for o in out])), 4),
    }


def default_checkpoint(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoint.pt")


def train_bundle(
    bundle,
    output: Path,
    *,
    settings: TrainSettings,
    steps: int,
    corpus: Path | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    save_every: int = 25,
    device: str = "cpu",
    storage: str | None = None,
    validate: int = 4,
    validate_every: int = 100,
    train_aux: bool = False,
    report=None,
    notice=None,
) -> dict:
    """Train ``bundle``'s predictor for ``steps`` steps (counted from the start of the run a
    resumed checkpoint belongs to) and write a bundle with it to ``output``. A checkpoint is
    saved every ``save_every`` steps and on Ctrl-C. ``report(row)`` after every step;
    ``notice(text)`` for what the user should know. ``validate`` held-out sequences are
    scored at the start, every ``validate_every`` steps and at the end."""
    from kvcli.bundles.build import bundle_with_predictor
    from kvcli.engine.bundle import check_compatible, sha256_file
    from kvcli.predict.predictor import load_predictor

    output = Path(output)
    checkpoint = Path(checkpoint) if checkpoint else default_checkpoint(output)
    if steps < 1:
        raise KvcliError(f"--steps must be at least 1, not {steps}")
    check_compatible(bundle.base, bundle.aux_source, bundle.predictor)
    pred = load_predictor(bundle.predictor)
    reason = trainable_reason(pred)
    if reason:
        raise KvcliError(reason)
    settings.check()
    if resume and not checkpoint.is_file():
        raise KvcliError(f"--resume: no checkpoint at {checkpoint}")
    if not resume and checkpoint.exists():
        raise KvcliError(
            f"a checkpoint of an earlier run is at {checkpoint}: --resume continues "
            f"it; delete it to start over"
        )
    from kvcli.train.data import training_sequences, validation_sequences

    sequences, source = training_sequences(bundle.base, settings.tokens, corpus)
    trainer = PredictorTrainer(
        bundle.base, bundle.aux_source, pred, settings, device=device, train_aux=train_aux
    )
    identity = {
        "predictor_sha256": sha256_file(bundle.predictor),
        "source": source,
        **dataclasses.asdict(settings),
        "l1_weight": trainer.l1_weight,
        "train_aux": train_aux,
    }
    if resume:
        trainer.restore(load_checkpoint(checkpoint), identity)
        if notice:
            notice(f"resumed at step {trainer.step} from {checkpoint}")
    held = validation_sequences(bundle.base, settings.tokens, validate) if validate else []

    def check() -> None:
        if held:
            validation.append(validation_losses(trainer, held))
            if notice:
                v = validation[-1]
                notice(
                    f"step {v['step']}: held-out cross-entropy {v['ce']} (the base over its own "
                    f"cache: {v['ce_base']}), K/V L1 {v['kv_l1']}"
                )

    rows, validation = [], []
    check()
    try:
        while trainer.step < steps:
            index = order_of_sequences(len(sequences), trainer.step, settings.seed)
            rows.append(trainer.train_step(sequences[index][1]))
            if report:
                report(rows[-1])
            if trainer.step % save_every == 0 and trainer.step < steps:
                save_checkpoint(trainer.checkpoint(identity), checkpoint)
            if validate_every and trainer.step % validate_every == 0 and trainer.step < steps:
                check()
    except KeyboardInterrupt:
        save_checkpoint(trainer.checkpoint(identity), checkpoint)
        if notice:
            notice(f"checkpoint of step {trainer.step} saved to {checkpoint}: run again with --resume")
        raise
    save_checkpoint(trainer.checkpoint(identity), checkpoint)
    check()
    bundle_with_predictor(
        bundle,
        trainer.predictor(source),
        output,
        storage,
        aux_weights={k: t.detach().cpu().numpy() for k, t in trainer.aux_params.items()},
    )
    first, last = rows[: min(10, len(rows))], rows[-min(10, len(rows)) :]

    def mean(key, part):
        return round(float(np.mean([r[key] for r in part])), 4) if part else None

    return TrainSummary(
        output=str(output),
        checkpoint=str(checkpoint),
        step=trainer.step,
        steps_this_run=len(rows),
        tokens_per_sequence=settings.tokens,
        tail=settings.tail,
        sequences_available=len(sequences),
        source=source,
        l1_weight=trainer.l1_weight,
        lr=settings.lr,
        seed=settings.seed,
        device=device,
        train_aux=train_aux,
        aux_ce_last_10=mean("aux_ce", last) if train_aux else None,
        ce_first_10=mean("ce", first),
        ce_last_10=mean("ce", last),
        ce_base_last_10=mean("ce_base", last),
        kv_l1_first_10=mean("kv_l1", first),
        kv_l1_last_10=mean("kv_l1", last),
        tokens_per_s=round(float(np.median([r["tokens_per_s"] for r in rows])), 1) if rows else None,
        validation=validation,
        history=[{k: round(r[k], 4) for k in ("step", "ce", "ce_base", "kv_l1", "seconds")} for r in rows],
    )
