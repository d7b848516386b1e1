"""Sharing: cards of folders on disk, pushing to the Hub, exporting (cast, servable, merged).

    cards    rewrite a folder's card, classify a folder
    push     upload an adapter, refusing forget and negated ones without a flag
    export   cast, make servable for vLLM / LoRAX, merge into a full-precision model
    merge    dense deltas into a full-precision base (export and dense PerTA)

Hub sits on top: it may import core, arithmetic, training and serving, never evaluate.
"""
