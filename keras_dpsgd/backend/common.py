"""Pieces the backend modules share (no backend-specific code here)."""


def seed_state_positions(model):
    """Indices of Keras SeedGenerator states (dropout and other random layers)
    in `model.non_trainable_variables`."""
    return [i for i, v in enumerate(model.non_trainable_variables)
            if v.name == "seed_generator_state"]


def stateless_loss(model, trainable, non_trainable, metrics_vars, x, y, sample_weight):
    """Training loss and prediction of a batch, statelessly: what Keras' JAX
    trainer calls `compute_loss_and_updates`, which the TF and torch trainers
    lack. Returns (loss, y_pred)."""
    kwargs = {"training": True} if model._call_has_training_arg else {}
    y_pred, _, losses = model.stateless_call(
        trainable, non_trainable, x, return_losses=True, **kwargs)
    if losses:
        model._losses_override.clear()
        model._losses_override = losses
    loss, _ = model.stateless_compute_loss(
        trainable, non_trainable, metrics_vars, x=x, y=y, y_pred=y_pred,
        sample_weight=sample_weight, training=True)
    if losses:
        model._losses_override.clear()
    return loss, y_pred


def add_batch_axis(structure):
    """A leading axis of size 1 on every tensor of a structure (None stays None)."""
    from keras import tree

    return None if structure is None else tree.map_structure(lambda t: t[None], structure)
