"""Making adapters: the Trainer, the objectives, importance maps, data sources, recipes, selection.

    trainer      TrainConfig, the Trainer subclass (one compute_loss), learn / train_adapter
    objectives/  one file per objective (nll, grad_ascent, grad_diff, kl, npo, idk, surgery), one registry
    importance   PerTA's gradient / Fisher importance (runs the model; the rescaling is arithmetic's)
    sources      named data: TOFU-mini, full TOFU, knowledge-edit files
    jobs         processes, work folders, checkpoints and resume
    recipes      the YAML schema of end-to-end methods, loaded and checked before anything runs
    runner       running a recipe's steps, resumable, published atomically
    select       choosing lam / alpha on held-out data, without the answer key

Training imports core and arithmetic, never serving, evaluate or hub.
"""
